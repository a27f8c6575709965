//! The kernel NBD driver's generic netlink family (`"nbd"`, version 1):
//! the messages the tracker sends and the one reply it reads.
//!
//! Building a request is pure (a [`Genlmsghdr`] out of plain values) and
//! so is reading a reply ([`connect_reply_index`], [`status_devices`]);
//! only [`NbdFamily`] owns the netlink socket. The numbers are the
//! kernel's UAPI (`include/uapi/linux/nbd-netlink.h`); attributes are in
//! host byte order, as netlink always is.
//!
//! ```text
//!  NBD_CMD_CONNECT / NBD_CMD_RECONFIGURE
//!   ├ NBD_ATTR_INDEX              u32   (connect: omitted = first free)
//!   ├ NBD_ATTR_SIZE_BYTES         u64   (connect; reconfigure: a grown disk)
//!   ├ NBD_ATTR_BLOCK_SIZE_BYTES   u64   (connect)
//!   ├ NBD_ATTR_SERVER_FLAGS       u64   (connect: transmission flags)
//!   ├ NBD_ATTR_TIMEOUT            u64   seconds per request
//!   ├ NBD_ATTR_DEAD_CONN_TIMEOUT  u64   seconds to wait for a new socket
//!   ├ NBD_ATTR_BACKEND_IDENTIFIER string (NUL-terminated)
//!   └ NBD_ATTR_SOCKETS            nested
//!      └ NBD_SOCK_ITEM            nested   (one per connection)
//!         └ NBD_SOCK_FD           u32      a descriptor of the sender
//!  reply to CONNECT: NBD_ATTR_INDEX u32
//!  NBD_CMD_STATUS reply: NBD_ATTR_DEVICE_LIST nested
//!   └ NBD_DEVICE_ITEM nested
//!      ├ NBD_DEVICE_INDEX      u32
//!      └ NBD_DEVICE_CONNECTED  u8
//! ```

use std::os::fd::RawFd;

use neli::consts::nl::NlmF;
use neli::consts::socket::NlFamily;
use neli::err::RouterError;
use neli::genl::{AttrTypeBuilder, Genlmsghdr, GenlmsghdrBuilder, Nlattr, NlattrBuilder};
use neli::nl::NlPayload;
use neli::router::synchronous::NlRouter;
use neli::types::{Buffer, GenlBuffer};
use neli::utils::Groups;

use super::AttachError;

/// The family's name, as the kernel registers it.
pub const FAMILY_NAME: &str = "nbd";
/// The family's version.
pub const FAMILY_VERSION: u8 = 1;

/// `NBD_CMD_*`: the family's commands.
pub mod cmd {
    /// Attach a device to sockets.
    pub const CONNECT: u8 = 1;
    /// Detach a device.
    pub const DISCONNECT: u8 = 2;
    /// Change a configured device (hand it new sockets).
    pub const RECONFIGURE: u8 = 3;
    /// Ask which devices exist and which are configured.
    pub const STATUS: u8 = 5;
}

/// `NBD_ATTR_*`: top-level attributes.
pub mod attr {
    /// u32: the device index (N of /dev/nbdN).
    pub const INDEX: u16 = 1;
    /// u64: the device size in bytes.
    pub const SIZE_BYTES: u16 = 2;
    /// u64: the logical block size in bytes.
    pub const BLOCK_SIZE_BYTES: u16 = 3;
    /// u64: per-request timeout in seconds.
    pub const TIMEOUT: u16 = 4;
    /// u64: the server's transmission flags.
    pub const SERVER_FLAGS: u16 = 5;
    /// u64: `NBD_CFLAG_*`.
    pub const CLIENT_FLAGS: u16 = 6;
    /// Nested: `NBD_SOCK_ITEM`s.
    pub const SOCKETS: u16 = 7;
    /// u64: seconds to wait for a new socket once all are dead.
    pub const DEAD_CONN_TIMEOUT: u16 = 8;
    /// Nested: `NBD_DEVICE_ITEM`s (status replies).
    pub const DEVICE_LIST: u16 = 9;
    /// String: who serves the device; shown in /sys/block/nbdN/backend
    /// and required to match on reconfigure.
    pub const BACKEND_IDENTIFIER: u16 = 10;
}

/// `NBD_SOCK_ITEM`, and inside it `NBD_SOCK_FD`.
pub mod sock {
    /// Nested: one socket.
    pub const ITEM: u16 = 1;
    /// u32: the socket's descriptor in the sending process.
    pub const FD: u16 = 1;
}

/// `NBD_DEVICE_ITEM`, and inside it `NBD_DEVICE_*`.
pub mod device {
    /// Nested: one device.
    pub const ITEM: u16 = 1;
    /// u32: its index.
    pub const INDEX: u16 = 1;
    /// u8: 1 if it is configured (has a connection).
    pub const CONNECTED: u16 = 2;
}

/// A message of the family, as neli types it.
pub type NbdMessage = Genlmsghdr<u8, u16>;

/// What a new attachment is told: everything the handshake would have
/// told a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    /// `Some(n)`: exactly /dev/nbdN; `None`: the first unused device.
    pub index: Option<u32>,
    /// Export size in bytes.
    pub size: u64,
    /// Logical block size.
    pub block_size: u64,
    /// Transmission flags as the server offers them.
    pub server_flags: u64,
    /// Seconds a request may take before the kernel requeues it.
    pub timeout_secs: u64,
    /// Seconds the kernel waits for a new socket once the connection died.
    pub dead_conn_timeout_secs: u64,
    /// Names the server (see [`attr::BACKEND_IDENTIFIER`]).
    pub backend: String,
    /// The client end of the connection.
    pub socket: RawFd,
}

/// What hands a configured device a new socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReconfigureRequest {
    /// The device.
    pub index: u32,
    /// Must equal the identifier the device was connected with.
    pub backend: String,
    /// Per-request timeout, seconds.
    pub timeout_secs: u64,
    /// Dead-connection timeout, seconds.
    pub dead_conn_timeout_secs: u64,
    /// The new client end.
    pub socket: RawFd,
}

/// Why a message could not be built (neli's builders refused a value).
fn build_error(error: impl std::fmt::Display) -> AttachError {
    AttachError::Message(error.to_string())
}

fn plain<P>(kind: u16, payload: P) -> Result<Nlattr<u16, Buffer>, AttachError>
where
    P: neli::Size + neli::ToBytes,
{
    NlattrBuilder::default()
        .nla_type(
            AttrTypeBuilder::default()
                .nla_type(kind)
                .build()
                .map_err(build_error)?,
        )
        .nla_payload(payload)
        .build()
        .map_err(build_error)
}

fn nested(kind: u16, inner: &[Nlattr<u16, Buffer>]) -> Result<Nlattr<u16, Buffer>, AttachError> {
    let mut outer = NlattrBuilder::default()
        .nla_type(
            AttrTypeBuilder::default()
                .nla_type(kind)
                .nla_nested(true)
                .build()
                .map_err(build_error)?,
        )
        .nla_payload(Vec::<u8>::new())
        .build()
        .map_err(build_error)?;
    for attr in inner {
        outer = outer.nest(attr).map_err(build_error)?;
    }
    Ok(outer)
}

/// `NBD_ATTR_SOCKETS` holding one socket.
fn sockets(fd: RawFd) -> Result<Nlattr<u16, Buffer>, AttachError> {
    let fd = u32::try_from(fd).map_err(|_| AttachError::Message(format!("bad descriptor {fd}")))?;
    let item = nested(sock::ITEM, &[plain(sock::FD, fd)?])?;
    nested(attr::SOCKETS, &[item])
}

/// The backend identifier as the kernel wants a string: NUL-terminated.
fn c_string(text: &str) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

fn message(command: u8, attrs: Vec<Nlattr<u16, Buffer>>) -> Result<NbdMessage, AttachError> {
    GenlmsghdrBuilder::default()
        .cmd(command)
        .version(FAMILY_VERSION)
        .attrs(attrs.into_iter().collect::<GenlBuffer<u16, Buffer>>())
        .build()
        .map_err(build_error)
}

/// `NBD_CMD_CONNECT`.
pub fn connect_message(request: &ConnectRequest) -> Result<NbdMessage, AttachError> {
    let mut attrs = Vec::new();
    if let Some(index) = request.index {
        attrs.push(plain(attr::INDEX, index)?);
    }
    attrs.push(plain(attr::SIZE_BYTES, request.size)?);
    attrs.push(plain(attr::BLOCK_SIZE_BYTES, request.block_size)?);
    attrs.push(plain(attr::SERVER_FLAGS, request.server_flags)?);
    attrs.push(plain(attr::TIMEOUT, request.timeout_secs)?);
    attrs.push(plain(
        attr::DEAD_CONN_TIMEOUT,
        request.dead_conn_timeout_secs,
    )?);
    // No NBD_CFLAG_DESTROY_ON_DISCONNECT (the device outlives a tracker
    // restart) and no DISCONNECT_ON_CLOSE (closing the device is not a
    // reason to detach it).
    attrs.push(plain(attr::CLIENT_FLAGS, 0u64)?);
    attrs.push(plain(
        attr::BACKEND_IDENTIFIER,
        Buffer::from(c_string(&request.backend)),
    )?);
    attrs.push(sockets(request.socket)?);
    message(cmd::CONNECT, attrs)
}

/// `NBD_CMD_RECONFIGURE` with a new socket.
pub fn reconfigure_message(request: &ReconfigureRequest) -> Result<NbdMessage, AttachError> {
    message(
        cmd::RECONFIGURE,
        vec![
            plain(attr::INDEX, request.index)?,
            plain(
                attr::BACKEND_IDENTIFIER,
                Buffer::from(c_string(&request.backend)),
            )?,
            plain(attr::TIMEOUT, request.timeout_secs)?,
            plain(attr::DEAD_CONN_TIMEOUT, request.dead_conn_timeout_secs)?,
            sockets(request.socket)?,
        ],
    )
}

/// `NBD_CMD_RECONFIGURE` with a new size only: the kernel sets the
/// device's capacity and tells its users (the driver has honoured
/// `NBD_ATTR_SIZE_BYTES` on reconfigure since Linux 5.3).
pub fn resize_message(index: u32, backend: &str, size: u64) -> Result<NbdMessage, AttachError> {
    message(
        cmd::RECONFIGURE,
        vec![
            plain(attr::INDEX, index)?,
            plain(attr::BACKEND_IDENTIFIER, Buffer::from(c_string(backend)))?,
            plain(attr::SIZE_BYTES, size)?,
        ],
    )
}

/// `NBD_CMD_DISCONNECT`.
pub fn disconnect_message(index: u32) -> Result<NbdMessage, AttachError> {
    message(cmd::DISCONNECT, vec![plain(attr::INDEX, index)?])
}

/// `NBD_CMD_STATUS` for one device, or all of them.
pub fn status_message(index: Option<u32>) -> Result<NbdMessage, AttachError> {
    let attrs = match index {
        Some(index) => vec![plain(attr::INDEX, index)?],
        None => Vec::new(),
    };
    message(cmd::STATUS, attrs)
}

/// The device index in the kernel's reply to `NBD_CMD_CONNECT`.
pub fn connect_reply_index(reply: &NbdMessage) -> Result<u32, AttachError> {
    reply
        .attrs()
        .get_attr_handle()
        .get_attr_payload_as::<u32>(attr::INDEX)
        .map_err(|e| AttachError::Message(format!("the connect reply has no device index: {e}")))
}

/// One device of a status reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceStatus {
    /// N of /dev/nbdN.
    pub index: u32,
    /// Whether it is configured.
    pub connected: bool,
}

/// The devices of an `NBD_CMD_STATUS` reply.
pub fn status_devices(reply: &NbdMessage) -> Result<Vec<DeviceStatus>, AttachError> {
    let bad = |e: neli::err::DeError| AttachError::Message(format!("a status reply: {e}"));
    let handle = reply.attrs().get_attr_handle();
    let list = handle
        .get_nested_attributes::<u16>(attr::DEVICE_LIST)
        .map_err(bad)?;
    let mut devices = Vec::new();
    for item in list.iter() {
        if *item.nla_type().nla_type() != device::ITEM {
            continue;
        }
        let fields = item.get_attr_handle::<u16>().map_err(bad)?;
        let index = fields
            .get_attr_payload_as::<u32>(device::INDEX)
            .map_err(bad)?;
        let connected = fields
            .get_attr_payload_as::<u8>(device::CONNECTED)
            .map_err(bad)?;
        devices.push(DeviceStatus {
            index,
            connected: connected != 0,
        });
    }
    Ok(devices)
}

/// A netlink socket speaking to the kernel's NBD family.
pub struct NbdFamily {
    router: NlRouter,
    id: u16,
}

impl NbdFamily {
    /// Opens a generic netlink socket and looks the family up.
    pub fn open() -> Result<Self, AttachError> {
        let (router, _) = NlRouter::connect(NlFamily::Generic, None, Groups::empty())
            .map_err(|e| AttachError::Netlink(format!("opening a generic netlink socket: {e}")))?;
        let id = router
            .resolve_genl_family(FAMILY_NAME)
            .map_err(|_| AttachError::NoNbdFamily)?;
        Ok(Self { router, id })
    }

    /// Sends `message` and collects the replies before the kernel's ack;
    /// an error reply becomes the [`AttachError`] its errno means.
    pub fn request(&self, message: NbdMessage) -> Result<Vec<NbdMessage>, AttachError> {
        let command = *message.cmd();
        let replies = self
            .router
            .send::<u16, NbdMessage, u16, NbdMessage>(
                self.id,
                NlmF::ACK,
                NlPayload::Payload(message),
            )
            .map_err(|e| AttachError::Netlink(format!("sending a netlink request: {e}")))?;
        let mut out = Vec::new();
        for reply in replies {
            match reply {
                Ok(reply) => {
                    if let NlPayload::Payload(payload) = reply.nl_payload() {
                        out.push(payload.clone());
                    }
                }
                Err(RouterError::Nlmsgerr(error)) => {
                    return Err(AttachError::from_errno(command, -*error.error()));
                }
                Err(error) => {
                    return Err(AttachError::Netlink(format!(
                        "reading the kernel's reply: {error}"
                    )))
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neli::{FromBytesWithInput, Size, ToBytes};
    use std::io::Cursor;

    fn bytes(message: &NbdMessage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        message.to_bytes(&mut out).unwrap();
        out.into_inner()
    }

    /// (type, payload) of each top-level attribute after the 4-byte genl
    /// header, walked by hand: the layout the kernel parses.
    fn walk(mut attrs: &[u8]) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        while attrs.len() >= 4 {
            let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
            let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
            out.push((kind, attrs[4..len].to_vec()));
            let padded = (len + 3) & !3;
            attrs = &attrs[padded.min(attrs.len())..];
        }
        out
    }

    fn request() -> ConnectRequest {
        ConnectRequest {
            index: None,
            size: 256 << 20,
            block_size: 4096,
            server_flags: 0x1 | 0x4 | 0x8 | 0x20,
            timeout_secs: 30,
            dead_conn_timeout_secs: 120,
            backend: "tidemark:default:disk".into(),
            socket: 7,
        }
    }

    #[test]
    fn connect_carries_every_attribute_in_host_order() {
        let wire = bytes(&connect_message(&request()).unwrap());
        assert_eq!(wire[0], cmd::CONNECT);
        assert_eq!(wire[1], FAMILY_VERSION);
        let attrs = walk(&wire[4..]);
        let kinds: Vec<u16> = attrs.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            kinds,
            [
                attr::SIZE_BYTES,
                attr::BLOCK_SIZE_BYTES,
                attr::SERVER_FLAGS,
                attr::TIMEOUT,
                attr::DEAD_CONN_TIMEOUT,
                attr::CLIENT_FLAGS,
                attr::BACKEND_IDENTIFIER,
                attr::SOCKETS
            ],
            "no index: the kernel picks the first free device"
        );
        assert_eq!(attrs[0].1, (256u64 << 20).to_ne_bytes());
        assert_eq!(attrs[1].1, 4096u64.to_ne_bytes());
        assert_eq!(attrs[2].1, 0x2du64.to_ne_bytes());
        assert_eq!(attrs[3].1, 30u64.to_ne_bytes());
        assert_eq!(attrs[4].1, 120u64.to_ne_bytes());
        assert_eq!(attrs[6].1, b"tidemark:default:disk\0");
        // SOCKETS → SOCK_ITEM → SOCK_FD = 7
        let items = walk(&attrs[7].1);
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].0, sock::ITEM);
        assert_eq!(
            walk(&items[0].1),
            vec![(sock::FD, 7u32.to_ne_bytes().to_vec())]
        );
    }

    #[test]
    fn a_chosen_index_comes_first() {
        let wire = bytes(
            &connect_message(&ConnectRequest {
                index: Some(3),
                ..request()
            })
            .unwrap(),
        );
        let attrs = walk(&wire[4..]);
        assert_eq!(attrs[0], (attr::INDEX, 3u32.to_ne_bytes().to_vec()));
    }

    #[test]
    fn reconfigure_names_the_device_its_backend_and_the_new_socket() {
        let wire = bytes(
            &reconfigure_message(&ReconfigureRequest {
                index: 2,
                backend: "b".into(),
                timeout_secs: 5,
                dead_conn_timeout_secs: 60,
                socket: 11,
            })
            .unwrap(),
        );
        assert_eq!(wire[0], cmd::RECONFIGURE);
        let attrs = walk(&wire[4..]);
        assert_eq!(attrs[0], (attr::INDEX, 2u32.to_ne_bytes().to_vec()));
        assert_eq!(attrs[1], (attr::BACKEND_IDENTIFIER, b"b\0".to_vec()));
        let socks = walk(&attrs[4].1);
        assert_eq!(
            walk(&socks[0].1)[0],
            (sock::FD, 11u32.to_ne_bytes().to_vec())
        );
        assert_eq!(
            walk(&bytes(&disconnect_message(9).unwrap())[4..]),
            vec![(attr::INDEX, 9u32.to_ne_bytes().to_vec())]
        );
    }

    #[test]
    fn resize_names_the_device_its_backend_and_the_size_and_no_socket() {
        let wire = bytes(&resize_message(4, "tidemark:g:d", 96 << 20).unwrap());
        assert_eq!(wire[0], cmd::RECONFIGURE);
        assert_eq!(
            walk(&wire[4..]),
            vec![
                (attr::INDEX, 4u32.to_ne_bytes().to_vec()),
                (attr::BACKEND_IDENTIFIER, b"tidemark:g:d\0".to_vec()),
                (attr::SIZE_BYTES, (96u64 << 20).to_ne_bytes().to_vec()),
            ]
        );
    }

    #[test]
    fn a_negative_descriptor_is_an_error_not_a_panic() {
        assert!(matches!(
            connect_message(&ConnectRequest {
                socket: -1,
                ..request()
            }),
            Err(AttachError::Message(_))
        ));
    }

    /// Bytes of one attribute, padded.
    fn encode_attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let len = 4 + payload.len();
        let mut out = Vec::new();
        out.extend_from_slice(&(len as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize((len + 3) & !3, 0);
        out
    }

    fn parse(wire: &[u8]) -> Result<NbdMessage, neli::err::DeError> {
        NbdMessage::from_bytes_with_input(&mut Cursor::new(wire), wire.len())
    }

    #[test]
    fn replies_from_the_kernel_parse() {
        let mut wire = vec![cmd::CONNECT, FAMILY_VERSION, 0, 0];
        wire.extend(encode_attr(attr::INDEX, &4u32.to_ne_bytes()));
        let reply = parse(&wire).unwrap();
        assert_eq!(reply.padded_size(), wire.len());
        assert_eq!(connect_reply_index(&reply).unwrap(), 4);

        let device = |index: u32, connected: u8| {
            let mut fields = encode_attr(device::INDEX, &index.to_ne_bytes());
            fields.extend(encode_attr(device::CONNECTED, &[connected]));
            encode_attr(device::ITEM, &fields)
        };
        let mut list = device(0, 1);
        list.extend(device(1, 0));
        let mut wire = vec![cmd::STATUS, FAMILY_VERSION, 0, 0];
        wire.extend(encode_attr(attr::DEVICE_LIST, &list));
        let devices = status_devices(&parse(&wire).unwrap()).unwrap();
        assert_eq!(
            devices,
            [
                DeviceStatus {
                    index: 0,
                    connected: true
                },
                DeviceStatus {
                    index: 1,
                    connected: false
                }
            ]
        );
    }

    #[test]
    fn replies_missing_their_attributes_are_errors() {
        let wire = vec![cmd::CONNECT, FAMILY_VERSION, 0, 0];
        assert!(connect_reply_index(&parse(&wire).unwrap()).is_err());
        assert!(status_devices(&parse(&wire).unwrap()).is_err());
        // A device item without its index.
        let mut wire = vec![cmd::STATUS, FAMILY_VERSION, 0, 0];
        wire.extend(encode_attr(
            attr::DEVICE_LIST,
            &encode_attr(device::ITEM, &encode_attr(device::CONNECTED, &[1])),
        ));
        assert!(status_devices(&parse(&wire).unwrap()).is_err());
    }

    proptest::proptest! {
        /// Whatever the kernel (or anything on the socket) sends, reading
        /// it is an answer or an error, never a panic.
        #[test]
        fn garbage_replies_never_panic(wire in proptest::collection::vec(proptest::num::u8::ANY, 0..96)) {
            if let Ok(message) = parse(&wire) {
                let _ = connect_reply_index(&message);
                let _ = status_devices(&message);
            }
        }
    }
}
