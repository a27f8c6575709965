//! Fuzz targets for Tidemark's decoders: everything that reads bytes or
//! text another party (a client, a peer, a damaged disk, an admin) wrote.
//!
//! Each target is a harness here and a two-line binary in `fuzz_targets/`
//! that `cargo fuzz` builds with libFuzzer; `scripts/fuzz.sh` runs them all
//! for a bounded time. A harness calls the crates' public decode entry
//! points (the replica store's private codecs through
//! `tidemark_receiver::store::fuzzing`), never a copy of them, and checks
//! more than "no panic" where the format promises more: what decodes
//! encodes back to the same bytes, sessions hand on only what the protocol
//! allows. A failed check or a panic is a crash, and every crash is a bug
//! in the decoder.
//!
//! Each target also makes its seed corpus with the real encoders ([`seeds`]),
//! so the seeds follow every format change: fuzzing starts from valid
//! conversations, logs and stores rather than from nothing.
//!
//! | target             | decoder                                                     |
//! |--------------------|-------------------------------------------------------------|
//! | `nbd_handshake`    | NBD option haggling, then requests (`tracker/src/nbd`)      |
//! | `nbd_transmission` | NBD request headers against a session (`tracker/src/nbd`)   |
//! | `wire_frame`       | frame stream in pieces (`wire/src/frame.rs`)                |
//! | `wire_message`     | one message body (`wire/src/message.rs`)                    |
//! | `wire_receiver`    | the receiver's session fed a shipper's frames (`wire/src/receiver.rs`) |
//! | `changelog_record` | one record or segment header (`changelog/src/record.rs`, `segment.rs`) |
//! | `changelog_dir`    | a log directory: check, reader, replay, cursor, recovery (`changelog/src`) |
//! | `receiver_state`   | state file and journal entry codecs (`receiver/src/store`)  |
//! | `receiver_group`   | a group directory opened and recovered (`receiver/src/store`) |
//! | `config`           | configuration files, plans and values (`config/src`)        |

pub mod changelog;
pub mod checksums;
pub mod config;
pub mod input;
pub mod nbd;
pub mod receiver;
pub mod wire;

/// Seeds of a target: a short name and the input.
pub type Seeds = Vec<(&'static str, Vec<u8>)>;

/// One fuzz target.
pub struct Target {
    /// Its name, that of its binary in `fuzz_targets/`.
    pub name: &'static str,
    /// The harness: runs one input.
    pub run: fn(&[u8]),
    /// Makes its seeds with the real encoders.
    pub seeds: fn() -> Seeds,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "nbd_handshake",
        run: nbd::handshake,
        seeds: nbd::handshake_seeds,
    },
    Target {
        name: "nbd_transmission",
        run: nbd::transmission,
        seeds: nbd::transmission_seeds,
    },
    Target {
        name: "wire_frame",
        run: wire::frames,
        seeds: wire::frames_seeds,
    },
    Target {
        name: "wire_message",
        run: wire::message,
        seeds: wire::message_seeds,
    },
    Target {
        name: "wire_receiver",
        run: wire::receiver,
        seeds: wire::receiver_seeds,
    },
    Target {
        name: "changelog_record",
        run: changelog::record,
        seeds: changelog::record_seeds,
    },
    Target {
        name: "changelog_dir",
        run: changelog::directory,
        seeds: changelog::directory_seeds,
    },
    Target {
        name: "receiver_state",
        run: receiver::state,
        seeds: receiver::state_seeds,
    },
    Target {
        name: "receiver_group",
        run: receiver::group,
        seeds: receiver::group_seeds,
    },
    Target {
        name: "config",
        run: config::config,
        seeds: config::config_seeds,
    },
];

/// The target named `name`.
pub fn target(name: &str) -> &'static Target {
    TARGETS
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no fuzz target {name}"))
}

/// Runs once as a target starts (before libFuzzer reads its corpus): if
/// `TIDEMARK_FUZZ_SEEDS` names a directory, writes the target's seeds into
/// it as `seed-N-NAME`, replacing earlier ones.
pub fn seeds(name: &str) {
    let Some(dir) = std::env::var_os("TIDEMARK_FUZZ_SEEDS") else {
        return;
    };
    let dir = std::path::Path::new(&dir);
    std::fs::create_dir_all(dir).expect("creating the seed directory");
    for (i, (seed, bytes)) in (target(name).seeds)().into_iter().enumerate() {
        let path = dir.join(format!("seed-{i}-{seed}"));
        std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed runs through its harness (no crash to begin with).
    #[test]
    fn every_seed_runs() {
        for target in TARGETS {
            for (name, bytes) in (target.seeds)() {
                eprintln!("{} {name}: {} bytes", target.name, bytes.len());
                (target.run)(&bytes);
            }
        }
    }
}
