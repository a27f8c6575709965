//! What a served disk looks like to an NBD client, and the catalog the
//! handshake asks for it.
//!
//! The tracker decides which disks it serves and how (size, read-only,
//! flush / trim support, block sizes); the handshake only reads that through
//! [`ExportCatalog`]. Block sizes are a checked type because the transmission
//! validator divides by the minimum and the protocol puts hard rules on all
//! three values: a bad configuration is refused when it is built, not when a
//! client trips over it.

use thiserror::Error;

use super::constants::TransmissionFlags;

/// Largest minimum block size the protocol allows (64 KiB).
pub const MAX_MIN_BLOCK: u32 = 1 << 16;

/// Smallest preferred block size the protocol allows.
pub const MIN_PREFERRED_BLOCK: u32 = 512;

/// Maximum block size meaning "no inherent limit".
pub const UNLIMITED_MAX_BLOCK: u32 = u32::MAX;

/// Longest read, write, cache or write-zeroes request accepted whatever
/// maximum block size an export announces: 32 MiB. The protocol asks
/// clients that know no limit to stay within it, and the kernel's NBD client
/// sends requests up to it when attached by a tool that does not pass the
/// announcement on (`nbd-client`), so refusing them would only turn the
/// announcement into I/O errors. Every backend must therefore perform
/// requests up to this length.
pub const TOLERATED_MAX_BLOCK: u32 = 1 << 25;

/// An export's block size constraints, as advertised in `NBD_INFO_BLOCK_SIZE`
/// and enforced by the transmission validator (the maximum leniently: see
/// [`accepted_max`](Self::accepted_max)).
///
/// Invariants (from the protocol's "Block size constraints"): `min` is a
/// power of two in `1..=65536`; `preferred` is a power of two at least
/// `max(min, 512)`; `max` is a multiple of `min` (or `0xffffffff`) and at
/// least `preferred`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    min: u32,
    preferred: u32,
    max: u32,
}

impl BlockSizes {
    /// Checks the three sizes against the protocol's rules.
    pub const fn new(min: u32, preferred: u32, max: u32) -> Result<Self, BlockSizeError> {
        if !min.is_power_of_two() || min > MAX_MIN_BLOCK {
            return Err(BlockSizeError::Minimum { min });
        }
        let floor = if min > MIN_PREFERRED_BLOCK {
            min
        } else {
            MIN_PREFERRED_BLOCK
        };
        if !preferred.is_power_of_two() || preferred < floor {
            return Err(BlockSizeError::Preferred { preferred, min });
        }
        if max != UNLIMITED_MAX_BLOCK && !max.is_multiple_of(min) {
            return Err(BlockSizeError::MaximumNotMultiple { max, min });
        }
        if max < preferred {
            return Err(BlockSizeError::MaximumBelowPreferred { max, preferred });
        }
        Ok(Self {
            min,
            preferred,
            max,
        })
    }

    /// Smallest addressable unit: every offset and length must be a multiple.
    pub const fn min(self) -> u32 {
        self.min
    }

    /// Size at and above which aligned requests avoid read-modify-write.
    pub const fn preferred(self) -> u32 {
        self.preferred
    }

    /// Largest length of one read, write, cache or write-zeroes request, as
    /// announced to clients that read it.
    pub const fn max(self) -> u32 {
        self.max
    }

    /// Largest length of one read, write, cache or write-zeroes request the
    /// validator accepts: the announced maximum, but never below
    /// [`TOLERATED_MAX_BLOCK`].
    pub const fn accepted_max(self) -> u32 {
        if self.max > TOLERATED_MAX_BLOCK {
            self.max
        } else {
            TOLERATED_MAX_BLOCK
        }
    }
}

/// Why a set of block sizes breaks the protocol's rules. Always a local
/// configuration fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum BlockSizeError {
    /// The minimum is not a power of two between 1 and 64 KiB.
    #[error("minimum block size {min} is not a power of two between 1 and 65536")]
    Minimum {
        /// The rejected minimum.
        min: u32,
    },
    /// The preferred size is not a power of two at least `max(min, 512)`.
    #[error(
        "preferred block size {preferred} is not a power of two of at least \
         512 and at least the minimum {min}"
    )]
    Preferred {
        /// The rejected preferred size.
        preferred: u32,
        /// The minimum it was checked against.
        min: u32,
    },
    /// The maximum is neither a multiple of the minimum nor `0xffffffff`.
    #[error("maximum block size {max} is neither a multiple of the minimum {min} nor 0xffffffff")]
    MaximumNotMultiple {
        /// The rejected maximum.
        max: u32,
        /// The minimum it must be a multiple of.
        min: u32,
    },
    /// The maximum is smaller than the preferred size.
    #[error("maximum block size {max} is smaller than the preferred block size {preferred}")]
    MaximumBelowPreferred {
        /// The rejected maximum.
        max: u32,
        /// The preferred size it must reach.
        preferred: u32,
    },
}

/// One export: a disk the tracker serves, as a client sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// The name a client asks for. Names longer than
    /// [`MAX_STRING_LEN`](super::constants::MAX_STRING_LEN) bytes or
    /// containing NUL cannot be requested and are left out of listings.
    pub name: String,
    /// Human-readable description; may be empty.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags the tracker offers. The handshake always adds
    /// `HAS_FLAGS` and removes what the negotiated connection cannot use
    /// (`SEND_DF` without structured replies, `SEND_FAST_ZERO` without
    /// `SEND_WRITE_ZEROES`, extension bits the tracker does not implement).
    pub flags: TransmissionFlags,
    /// Block size constraints.
    pub block_sizes: BlockSizes,
}

/// The exports a connection may choose from. Asked during the handshake
/// only, never per request.
pub trait ExportCatalog {
    /// The export with this exact, non-empty name.
    fn lookup(&self, name: &str) -> Option<ExportInfo>;

    /// Every export a client may list, in the order to list them.
    fn list(&self) -> Vec<ExportInfo>;

    /// The export a client gets when it asks for the empty name, if any.
    fn default_export(&self) -> Option<ExportInfo> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typical_block_device_sizes_are_accepted() {
        let sizes = BlockSizes::new(512, 4096, 32 << 20).unwrap();
        assert_eq!(
            (sizes.min(), sizes.preferred(), sizes.max()),
            (512, 4096, 32 << 20)
        );
        assert!(BlockSizes::new(1, 512, UNLIMITED_MAX_BLOCK).is_ok());
        assert!(BlockSizes::new(65536, 65536, 65536).is_ok());
    }

    #[test]
    fn requests_up_to_32_mib_are_accepted_whatever_the_announced_maximum() {
        let accepted = |max| BlockSizes::new(1, 4096, max).unwrap().accepted_max();
        assert_eq!(accepted(4096), 32 << 20);
        assert_eq!(accepted(1 << 20), 32 << 20);
        assert_eq!(accepted(32 << 20), 32 << 20);
        assert_eq!(accepted(64 << 20), 64 << 20);
        assert_eq!(accepted(UNLIMITED_MAX_BLOCK), UNLIMITED_MAX_BLOCK);
    }

    #[test]
    fn sizes_that_break_the_protocol_are_refused() {
        assert_eq!(
            BlockSizes::new(0, 4096, 4096),
            Err(BlockSizeError::Minimum { min: 0 })
        );
        assert_eq!(
            BlockSizes::new(1 << 17, 1 << 17, 1 << 17),
            Err(BlockSizeError::Minimum { min: 1 << 17 })
        );
        assert_eq!(
            BlockSizes::new(512, 256, 4096),
            Err(BlockSizeError::Preferred {
                preferred: 256,
                min: 512
            })
        );
        assert_eq!(
            BlockSizes::new(4096, 2048, 4096),
            Err(BlockSizeError::Preferred {
                preferred: 2048,
                min: 4096
            })
        );
        assert_eq!(
            BlockSizes::new(4096, 4096, 10_000),
            Err(BlockSizeError::MaximumNotMultiple {
                max: 10_000,
                min: 4096
            })
        );
        assert_eq!(
            BlockSizes::new(512, 8192, 4096),
            Err(BlockSizeError::MaximumBelowPreferred {
                max: 4096,
                preferred: 8192
            })
        );
    }
}
