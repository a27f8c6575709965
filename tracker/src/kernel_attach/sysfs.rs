//! What `/sys/block/nbdN` tells about the kernel's NBD devices, and the
//! one queue setting the tracker changes.

use std::io;
use std::path::Path;

/// Where block devices appear.
const SYS_BLOCK: &str = "/sys/block";

/// The index of the configured device whose backend identifier is
/// `backend`, if any. The `backend` file exists only while a device
/// attached over netlink is configured, so a match is a device some
/// tracker left (or still serves).
pub fn find_by_backend(backend: &str) -> io::Result<Option<u32>> {
    find_by_backend_in(Path::new(SYS_BLOCK), backend)
}

fn find_by_backend_in(root: &Path, backend: &str) -> io::Result<Option<u32>> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(index) = name
            .to_str()
            .and_then(|n| n.strip_prefix("nbd"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        match std::fs::read_to_string(entry.path().join("backend")) {
            Ok(text) if text.trim_end_matches('\n') == backend => found.push(index),
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    found.sort_unstable();
    Ok(found.first().copied())
}

/// Sets `queue/max_sectors_kb` of /dev/nbd`index` to `max_request` bytes,
/// or the device's hardware limit if that is lower. Returns the value set
/// (KiB).
pub fn raise_max_request(index: u32, max_request: u32) -> io::Result<u32> {
    raise_max_request_in(Path::new(SYS_BLOCK), index, max_request)
}

fn raise_max_request_in(root: &Path, index: u32, max_request: u32) -> io::Result<u32> {
    let queue = root.join(format!("nbd{index}/queue"));
    let hardware = std::fs::read_to_string(queue.join("max_hw_sectors_kb"))?;
    let hardware: u32 = hardware.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("max_hw_sectors_kb reads {hardware:?}"),
        )
    })?;
    let wanted = (max_request / 1024).clamp(4, hardware.max(4));
    std::fs::write(queue.join("max_sectors_kb"), wanted.to_string())?;
    Ok(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_is_found_by_its_backend_identifier() {
        let root = tempfile::tempdir().unwrap();
        for (name, backend) in [
            ("nbd0", Some("tidemark:g:other\n")),
            ("nbd1", None),
            ("nbd12", Some("tidemark:g:disk\n")),
            ("nbd3", Some("tidemark:g:disk\n")),
            ("loop0", Some("tidemark:g:disk\n")),
        ] {
            let dir = root.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            if let Some(backend) = backend {
                std::fs::write(dir.join("backend"), backend).unwrap();
            }
        }
        assert_eq!(
            find_by_backend_in(root.path(), "tidemark:g:disk").unwrap(),
            Some(3),
            "the lowest matching nbd device"
        );
        assert_eq!(
            find_by_backend_in(root.path(), "tidemark:g:none").unwrap(),
            None
        );
        assert_eq!(
            find_by_backend_in(&root.path().join("absent"), "x").unwrap(),
            None
        );
    }

    #[test]
    fn the_largest_request_is_capped_by_the_hardware_limit() {
        let root = tempfile::tempdir().unwrap();
        let queue = root.path().join("nbd0/queue");
        std::fs::create_dir_all(&queue).unwrap();
        std::fs::write(queue.join("max_hw_sectors_kb"), "32767\n").unwrap();
        assert_eq!(
            raise_max_request_in(root.path(), 0, 32 << 20).unwrap(),
            32767
        );
        assert_eq!(
            std::fs::read_to_string(queue.join("max_sectors_kb")).unwrap(),
            "32767"
        );
        assert_eq!(raise_max_request_in(root.path(), 0, 1 << 20).unwrap(), 1024);
        std::fs::write(queue.join("max_hw_sectors_kb"), "junk").unwrap();
        assert!(raise_max_request_in(root.path(), 0, 1 << 20).is_err());
        assert!(raise_max_request_in(root.path(), 1, 1 << 20).is_err());
    }
}
