//! Small text files sealed with a checksum and replaced atomically: the
//! body, then a last line `crc32c XXXXXXXX` over every byte before it.
//! The log's `disks` file and the tracker's state file are written this way.

use std::io;
use std::path::{Path, PathBuf};
use tidemark_durable::{replace, Durability, FsDir};

/// `body` with its checksum line.
pub fn seal(body: &str) -> String {
    format!("{body}crc32c {:08x}\n", crc32c::crc32c(body.as_bytes()))
}

/// The body of a sealed text; `Err` says why it does not verify.
pub fn unseal(text: &str) -> Result<&str, &'static str> {
    let at = text.rfind("crc32c ").ok_or("no checksum line")?;
    let (body, crc_line) = text.split_at(at);
    let stored = u32::from_str_radix(crc_line.trim_start_matches("crc32c ").trim(), 16)
        .map_err(|_| "unreadable checksum")?;
    if crc32c::crc32c(body.as_bytes()) != stored {
        return Err("checksum mismatch");
    }
    Ok(body)
}

/// Replaces `dir/name` with `text`, atomically and durably: `dir/tmp`
/// (0600), fdatasync, rename, fsync of the directory. An error names the
/// path it concerns.
pub fn write_atomic(
    dir: &Path,
    tmp: &str,
    name: &str,
    text: &str,
) -> Result<(), (PathBuf, io::Error)> {
    let fs_dir = FsDir::existing(dir).map_err(|e| (dir.to_path_buf(), e))?;
    replace(&fs_dir, tmp, name, text.as_bytes(), Durability::Durable).map_err(|e| {
        let path = e.file.as_ref().map_or(dir.to_path_buf(), |f| dir.join(f));
        (path, e.source)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_body_round_trips(body in ".{0,300}") {
            let sealed = seal(&body);
            prop_assert_eq!(unseal(&sealed), Ok(body.as_str()));
        }

        #[test]
        fn arbitrary_text_never_panics(text in ".{0,300}", sealed in any::<bool>()) {
            // Sealed text reaches the parsing behind the checksum.
            let text = if sealed { seal(&text) } else { text };
            let _ = unseal(&text);
        }
    }

    #[test]
    fn sealed_text_round_trips_and_damage_is_named() {
        let text = seal("header\nline 1\n");
        assert_eq!(unseal(&text), Ok("header\nline 1\n"));
        assert_eq!(
            unseal(&text.replace("line 1", "line 2")),
            Err("checksum mismatch")
        );
        assert_eq!(unseal("header\n"), Err("no checksum line"));
        assert_eq!(unseal("header\ncrc32c zz\n"), Err("unreadable checksum"));
    }
}
