//! A span point on demand: `tidemark span take` leaves a request in the
//! span's directory; the span's coordinator (in the running receiver)
//! starts a round for it as soon as no other round runs, and answers
//! which point it is, or why none could start. The point's outcome is then
//! the span's record's (`crate::span`), like any other round's.
//!
//! ```text
//!  spans/SPAN/take.request   id N
//!                            label L
//!                            app-consistent yes   (absent: crash-consistent)
//!  spans/SPAN/take.result    id N
//!                            point P          (the round started)
//!                         or error TEXT       (why it could not start)
//! ```
//!
//! Both are sealed text files replaced atomically (as the drain request's,
//! `crate::drain`), so a torn or stale file reads as absent or as another
//! request, never as a wrong answer. A request whose answer is there
//! already is not taken again (a receiver restarting).

use std::io;
use std::path::Path;

use crate::drain::{field, read, write};
use tidemark_names::Label;

/// The request's file name in the span's directory.
pub const REQUEST: &str = "take.request";
/// The answer's file name in the span's directory.
pub const RESULT: &str = "take.result";

/// A request for a span point now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakeRequest {
    /// Names the request (the answer names it back).
    pub id: u64,
    /// The markers' label.
    pub label: Label,
    /// Quiesce every member first (an application-consistent point).
    pub app_consistent: bool,
}

/// The answer to request `id`: the point's id, or why no round started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakeResult {
    /// The request it answers.
    pub id: u64,
    /// The point being taken, or why none.
    pub result: Result<u64, String>,
}

/// Leaves a request for the span's coordinator.
pub fn write_request(span_dir: &Path, request: &TakeRequest) -> io::Result<()> {
    write(
        span_dir,
        REQUEST,
        &format!(
            "id {}\nlabel {}\n{}",
            request.id,
            request.label,
            if request.app_consistent {
                "app-consistent yes\n"
            } else {
                ""
            }
        ),
    )
}

/// The pending request, if there is one and it is readable.
pub fn read_request(span_dir: &Path) -> io::Result<Option<TakeRequest>> {
    let Some(lines) = read(span_dir, REQUEST)? else {
        return Ok(None);
    };
    let id = field(&lines, "id").and_then(|v| v.parse().ok());
    let label = field(&lines, "label").and_then(|v| Label::new(v).ok());
    let app_consistent = field(&lines, "app-consistent") == Some("yes");
    Ok(id.zip(label).map(|(id, label)| TakeRequest {
        id,
        label,
        app_consistent,
    }))
}

/// Writes the answer to a request.
pub fn write_result(span_dir: &Path, result: &TakeResult) -> io::Result<()> {
    let body = match &result.result {
        Ok(point) => format!("id {}\npoint {point}\n", result.id),
        Err(why) => format!("id {}\nerror {}\n", result.id, why.replace('\n', " ")),
    };
    write(span_dir, RESULT, &body)
}

/// The answer to the last request, if there is one.
pub fn read_result(span_dir: &Path) -> io::Result<Option<TakeResult>> {
    let Some(lines) = read(span_dir, RESULT)? else {
        return Ok(None);
    };
    let Some(id) = field(&lines, "id").and_then(|v| v.parse().ok()) else {
        return Ok(None);
    };
    let result = match (field(&lines, "point"), field(&lines, "error")) {
        (Some(point), None) => match point.parse() {
            Ok(p) => Ok(p),
            Err(_) => return Ok(None),
        },
        (None, Some(why)) => Err(why.to_string()),
        _ => return Ok(None),
    };
    Ok(Some(TakeResult { id, result }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_and_its_answers_read_back_and_damage_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_request(dir.path()).unwrap(), None);
        let request = TakeRequest {
            id: 17,
            label: Label::new("before-upgrade").unwrap(),
            app_consistent: false,
        };
        write_request(dir.path(), &request).unwrap();
        assert_eq!(read_request(dir.path()).unwrap(), Some(request));
        let app = TakeRequest {
            id: 18,
            label: Label::new("quiesced").unwrap(),
            app_consistent: true,
        };
        write_request(dir.path(), &app).unwrap();
        assert_eq!(read_request(dir.path()).unwrap(), Some(app));
        for result in [Ok(42), Err("db1/default is not connected".to_string())] {
            let answer = TakeResult { id: 17, result };
            write_result(dir.path(), &answer).unwrap();
            assert_eq!(read_result(dir.path()).unwrap(), Some(answer));
        }
        let mut text = std::fs::read_to_string(dir.path().join(RESULT)).unwrap();
        text = text.replace("17", "18");
        std::fs::write(dir.path().join(RESULT), text).unwrap();
        assert_eq!(read_result(dir.path()).unwrap(), None, "a changed answer");
    }
}
