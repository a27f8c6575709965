//! Moving a running VM's disks onto its tracker's NBD exports and back,
//! over QMP, without stopping the guest.
//!
//! Every disk has a format node (`raw` or `qcow2`) over a protocol node
//! (`file`/`host_device`, or `nbd` once protected). The move swaps the
//! protocol child under the format node with one `blockdev-reopen` of
//! every disk's format node (one transaction: all disks move or none):
//! qemu drains the node, flushes it onto the old child, swaps the child
//! and resumes, so each write lands either on the file before the swap or
//! goes through the tracker after it, and qcow2 keeps its caches (the new
//! child is the same bytes). No block job, no second copy.
//!
//! ```text
//! query-named-block-nodes     find each disk's format node (drv, file = its path
//!                             or its export's nbd+unix:///EXPORT?socket=SOCK URL),
//!                             its protocol node, the options to repeat
//! blockdev-add  (per disk)    the new child: nbd on the tracker's socket, or the file
//! blockdev-reopen             [{driver, node-name, file: NEW, backing, read-only,
//!                               detect-zeroes, cache, discard}, ...]
//! resync-all    (protect)     ask the tracker to record each disk as resync-needed
//! blockdev-del  (per disk)    the old child (it holds qemu's locks on the file)
//! query-named-block-nodes     verify: every format node on its new child,
//!                             the repeated options unchanged
//! ```
//!
//! `blockdev-reopen` resets every option it is not given, so the move
//! repeats what qemu reports of the node (`read-only`, `detect-zeroes`,
//! `cache`) and `discard=unmap` for a writable disk (what the renderings
//! give, and what lets a guest's trim reach the tracker); a qcow2 node
//! names its backing node (or `null`).
//!
//! Writes that reached the file before the tracker was in the path never
//! passed through it, so a protect always has the tracker record each
//! moved disk as resync-needed (as the dm splice does); a failed or
//! uncertain protect does so too. A lost monitor connection is followed
//! by a new one and a query of where each disk is.
//!
//! [`LiveMove`] holds the decisions and no I/O (`poll` for the next
//! [`Output`], `handle_*` for what came of it); [`run`] drives it over
//! [`crate::qmp::Qmp`].
//!
//! A disk whose guest device sits straight on a protocol node (no format
//! node) cannot be moved this way; the move refuses it
//! ([`LiveError::NoFormatNode`]).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use tidemark_config::{ImageFormat, VmSpec};

use crate::qmp::{Qmp, QmpError};

/// Which way the disks move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// From their files onto the tracker's exports.
    Protect,
    /// From the tracker's exports back onto their files.
    Unprotect,
}

/// A disk to move: one disk of the spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveDisk {
    /// Its name: the tracker's disk and export.
    pub name: String,
    /// Its image file or block device.
    pub path: PathBuf,
    /// Whether `path` is a block device (qemu's `host_device` driver).
    pub block_device: bool,
    /// Its image format.
    pub format: ImageFormat,
    /// The index of its backing disk among the disks moved.
    pub backing: Option<usize>,
}

impl LiveDisk {
    /// The disks of `spec` (`block_device` tells whether a path is a
    /// block device).
    pub fn of_spec(spec: &VmSpec, block_device: impl Fn(&Path) -> bool) -> Vec<LiveDisk> {
        spec.disks
            .iter()
            .map(|disk| LiveDisk {
                name: disk.name.as_str().to_owned(),
                path: disk.path.clone(),
                block_device: block_device(&disk.path),
                format: disk.format,
                backing: disk.backing.as_ref().and_then(|b| spec.disk_index(b)),
            })
            .collect()
    }
}

/// What the tracker's NBD export of `export` on `socket` is called by
/// qemu (the `file` of a node on it).
pub fn nbd_url(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// A command qemu refused: its error class and description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The error's class.
    pub class: String,
    /// Its description.
    pub desc: String,
}

/// What the driver is to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send this QMP command; answer with [`LiveMove::handle_reply`].
    Command {
        /// The command.
        execute: &'static str,
        /// Its arguments.
        arguments: Value,
    },
    /// Ask the tracker to record the whole disk as resync-needed; answer
    /// with [`LiveMove::handle_resync`].
    ResyncAll {
        /// The disk.
        disk: String,
    },
    /// The move is over.
    Done(MoveReport),
}

/// Why a move did not (wholly) happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(rename_all = "kebab-case", tag = "error")]
pub enum LiveError {
    /// No node of the disk's format reads its file (or its export): the VM
    /// does not use the disk, or names it differently.
    #[error(
        "no {format} node of the VM reads {from}: is the spec the VM's? \
         (a guest device attached straight to the file, without a format node, \
         cannot be moved live)"
    )]
    NoFormatNode {
        /// The disk.
        disk: String,
        /// Its format.
        format: &'static str,
        /// What the node should read now.
        from: String,
    },
    /// Several nodes of the disk's format read its file.
    #[error("several {format} nodes read {from}: {nodes:?}")]
    Ambiguous {
        /// The disk.
        disk: String,
        /// Its format.
        format: &'static str,
        /// What they read.
        from: String,
        /// Their names.
        nodes: Vec<String>,
    },
    /// The disk's protocol node (to remove after the move) was not found.
    #[error("no protocol node of the VM reads {from} (disk {disk})")]
    NoProtocolNode {
        /// The disk.
        disk: String,
        /// What it should read.
        from: String,
    },
    /// The image has a backing file the spec does not declare: moving it
    /// would leave its backing file read around the tracker.
    #[error(
        "disk {disk}'s image has the backing file {backing_file}, which the spec does not declare"
    )]
    UndeclaredBacking {
        /// The disk.
        disk: String,
        /// Its image's backing file.
        backing_file: String,
    },
    /// qemu refused a command: nothing was moved (the nodes added were
    /// removed).
    #[error("qemu refused {command}: {class}: {desc}; every disk is still on its old child")]
    Refused {
        /// The command.
        command: &'static str,
        /// The error's class.
        class: String,
        /// Its description.
        desc: String,
    },
    /// qemu answered with something its protocol does not say.
    #[error("qemu answered {command} with {answer}")]
    Unexpected {
        /// The command.
        command: &'static str,
        /// The answer.
        answer: String,
    },
    /// After the move a disk is not where it should be, or its options
    /// changed.
    #[error("after the move, disk {disk}'s node reads {found} (expected {expected})")]
    Verify {
        /// The disk.
        disk: String,
        /// What it should read, with its options.
        expected: String,
        /// What it reads.
        found: String,
    },
    /// The monitor connection was lost and could not be made again: where
    /// the disks are is unknown.
    #[error("lost qemu's monitor during the move: where the disks are is unknown")]
    Lost,
    /// The tracker did not record a moved disk as resync-needed: writes
    /// from before the move may be missing from the replica.
    #[error("the tracker did not record disk {disk} as resync-needed: {reason}")]
    Resync {
        /// The disk.
        disk: String,
        /// The tracker's error.
        reason: String,
    },
}

/// What became of one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskReport {
    /// The disk.
    pub disk: String,
    /// Its format node in the VM.
    pub node: Option<String>,
    /// What it read before.
    pub from: String,
    /// What it reads now.
    pub to: String,
    /// What happened.
    pub outcome: DiskOutcome,
    /// Whether the tracker recorded it as resync-needed.
    pub resync_recorded: bool,
    /// The old child, removed from qemu after the move (`None`: nothing
    /// to remove, or its removal failed: see `warnings`).
    pub removed_node: Option<String>,
}

/// What a move did to a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskOutcome {
    /// It moved.
    Moved,
    /// It was there already.
    AlreadyThere,
    /// It did not move.
    NotMoved,
    /// Unknown (the monitor was lost).
    Unknown,
}

/// What a move did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MoveReport {
    /// Which way.
    pub direction: Direction,
    /// Per disk.
    pub disks: Vec<DiskReport>,
    /// Why it failed, if it did.
    pub error: Option<LiveError>,
    /// What went wrong without failing the move (an old node not removed,
    /// an I/O error event seen meanwhile).
    pub warnings: Vec<String>,
}

/// One disk's part in the move, once planned.
#[derive(Debug, Clone)]
struct Step {
    /// The format node.
    node: String,
    /// Its current protocol child.
    old_child: String,
    /// The protocol node to add.
    new_child: String,
    /// `blockdev-add`'s arguments for it.
    add: Value,
    /// Its entry in `blockdev-reopen`.
    reopen: Value,
    /// The options that must read the same after the move.
    kept: Value,
}

/// Where the move is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Sent the first query.
    Planning,
    /// Sent `blockdev-add` of `steps[i]`.
    Adding(usize),
    /// Sent `blockdev-reopen`.
    Reopening,
    /// Asked the tracker about `disks[i]` (moved: `true`).
    Resyncing(usize, bool),
    /// Sent `blockdev-del` of `steps[i]`'s old child.
    Removing(usize),
    /// Sent the verifying query.
    Verifying,
    /// Sent `blockdev-del` of `steps[i]`'s new child, after a failure.
    CleaningUp(usize),
    /// Reconnected after a lost connection; sent a query.
    Requerying,
    /// Finished.
    Done,
}

/// The decisions of a live move (see the module's documentation).
#[derive(Debug)]
pub struct LiveMove {
    direction: Direction,
    socket: PathBuf,
    disks: Vec<LiveDisk>,
    /// Per disk: its step, or `None` when it needs none.
    steps: Vec<Option<Step>>,
    state: State,
    outbox: VecDeque<Output>,
    report: MoveReport,
}

impl LiveMove {
    /// A move of `disks` in `direction`, the tracker serving each as the
    /// export named after it on `socket`.
    pub fn new(direction: Direction, socket: &Path, disks: Vec<LiveDisk>) -> LiveMove {
        let mut mv = LiveMove {
            direction,
            socket: socket.to_owned(),
            steps: vec![None; disks.len()],
            report: MoveReport {
                direction,
                disks: Vec::new(),
                error: None,
                warnings: Vec::new(),
            },
            disks,
            state: State::Planning,
            outbox: VecDeque::new(),
        };
        mv.report.disks = (0..mv.disks.len())
            .map(|i| DiskReport {
                disk: mv.disks[i].name.clone(),
                node: None,
                from: mv.from(i),
                to: mv.to(i),
                outcome: DiskOutcome::NotMoved,
                resync_recorded: false,
                removed_node: None,
            })
            .collect();
        mv.send("query-named-block-nodes", json!({ "flat": true }));
        mv
    }

    /// The next thing to do.
    pub fn poll(&mut self) -> Option<Output> {
        self.outbox.pop_front()
    }

    /// What the disk reads before the move.
    fn from(&self, i: usize) -> String {
        let disk = &self.disks[i];
        match self.direction {
            Direction::Protect => disk.path.display().to_string(),
            Direction::Unprotect => nbd_url(&self.socket, &disk.name),
        }
    }

    /// What the disk reads after the move.
    fn to(&self, i: usize) -> String {
        let disk = &self.disks[i];
        match self.direction {
            Direction::Protect => nbd_url(&self.socket, &disk.name),
            Direction::Unprotect => disk.path.display().to_string(),
        }
    }

    fn send(&mut self, execute: &'static str, arguments: Value) {
        self.outbox
            .push_back(Output::Command { execute, arguments });
    }

    /// The command the state waits on an answer to.
    fn command(&self) -> &'static str {
        match self.state {
            State::Planning | State::Verifying | State::Requerying => "query-named-block-nodes",
            State::Adding(_) => "blockdev-add",
            State::Reopening => "blockdev-reopen",
            State::Removing(_) | State::CleaningUp(_) => "blockdev-del",
            State::Resyncing(..) | State::Done => "nothing",
        }
    }

    /// An asynchronous event qemu sent meanwhile: an I/O error is
    /// reported (and, when protecting, every disk is resynced anyway).
    pub fn handle_event(&mut self, name: &str, data: &Value) {
        if name == "BLOCK_IO_ERROR" || name == "BLOCK_JOB_ERROR" {
            self.report
                .warnings
                .push(format!("qemu reported {name} during the move: {data}"));
        }
    }

    /// qemu's answer to the last [`Output::Command`].
    pub fn handle_reply(&mut self, reply: Result<Value, Refusal>) {
        let command = self.command();
        match (self.state, reply) {
            (State::Planning, Ok(nodes)) => match self.plan(&nodes) {
                Ok(()) => self.next_add(0),
                Err(e) => self.fail(e, false),
            },
            (State::Adding(i), Ok(_)) => self.next_add(i + 1),
            (State::Adding(i), Err(r)) => {
                // `steps[i]`'s node was not added: clean up those before.
                self.fail_refused(command, r);
                self.next_cleanup_before(i);
            }
            (State::Reopening, Ok(_)) => {
                for (i, step) in self.steps.iter().enumerate() {
                    if step.is_some() {
                        self.report.disks[i].outcome = DiskOutcome::Moved;
                    }
                }
                self.next_resync(0, true);
            }
            (State::Reopening, Err(r)) => {
                self.fail_refused(command, r);
                self.next_cleanup_before(self.steps.len());
            }
            (State::Removing(i), reply) => {
                match reply {
                    Ok(_) => {
                        self.report.disks[i].removed_node =
                            self.steps[i].as_ref().map(|s| s.old_child.clone())
                    }
                    Err(r) => self.report.warnings.push(format!(
                        "disk {}: the old node {} was not removed ({}: {}); it holds qemu's \
                         lock on the file until the VM stops",
                        self.disks[i].name,
                        self.steps[i].as_ref().map_or("", |s| &s.old_child),
                        r.class,
                        r.desc
                    )),
                }
                self.next_remove(i + 1);
            }
            (State::Verifying, Ok(nodes)) => {
                if let Err(e) = self.verify(&nodes) {
                    self.fail(e, true);
                } else {
                    self.finish();
                }
            }
            (State::CleaningUp(i), reply) => {
                if let Err(r) = reply {
                    self.report.warnings.push(format!(
                        "the node {} added for disk {} was not removed: {}: {}",
                        self.steps[i].as_ref().map_or("", |s| &s.new_child),
                        self.disks[i].name,
                        r.class,
                        r.desc
                    ));
                }
                self.next_cleanup_before(i);
            }
            (State::Requerying, Ok(nodes)) => self.requeried(&nodes),
            (State::Planning | State::Verifying | State::Requerying, Err(r)) => {
                self.fail_refused(command, r);
                self.end_with_resync();
            }
            (State::Resyncing(..) | State::Done, _) => {}
        }
    }

    /// The tracker's answer to the last [`Output::ResyncAll`].
    pub fn handle_resync(&mut self, result: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
        let State::Resyncing(i, moved) = self.state else {
            return;
        };
        match result {
            Ok(()) => self.report.disks[i].resync_recorded = true,
            Err(e) => {
                let error = LiveError::Resync {
                    disk: self.disks[i].name.clone(),
                    reason: e.to_string(),
                };
                self.report.error.get_or_insert(error);
            }
        }
        self.next_resync(i + 1, moved);
    }

    /// The monitor connection was lost and a new one made: the last
    /// command's fate is unknown, so where the disks are is asked anew.
    pub fn handle_reconnected(&mut self) {
        if matches!(self.state, State::Done | State::Resyncing(..)) {
            return;
        }
        self.outbox.clear();
        if self.state == State::Planning {
            // Nothing was asked of qemu yet but the plan's query.
            self.send("query-named-block-nodes", json!({ "flat": true }));
            return;
        }
        self.state = State::Requerying;
        self.send("query-named-block-nodes", json!({ "flat": true }));
    }

    /// The monitor connection was lost for good.
    pub fn handle_gone(&mut self) {
        if self.state == State::Done {
            return;
        }
        self.outbox.clear();
        for (i, disk) in self.report.disks.iter_mut().enumerate() {
            if self.steps[i].is_some() && disk.outcome != DiskOutcome::Moved {
                disk.outcome = DiskOutcome::Unknown;
            }
        }
        self.report.error.get_or_insert(LiveError::Lost);
        self.end_with_resync();
    }

    /// Finds each disk's nodes in qemu's `query-named-block-nodes`.
    fn plan(&mut self, nodes: &Value) -> Result<(), LiveError> {
        let nodes = node_list(nodes)?;
        let names: Vec<&str> = nodes.iter().filter_map(|n| text(n, "node-name")).collect();
        let mut taken: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        // Format nodes first: a disk's reopen names its backing's node.
        let mut format_nodes = Vec::new();
        for i in 0..self.disks.len() {
            let disk = &self.disks[i];
            let format = disk.format.as_str();
            let (from, to) = (self.from(i), self.to(i));
            let on = |file: &str| -> Vec<&Value> {
                nodes
                    .iter()
                    .filter(|n| text(n, "drv") == Some(format) && text(n, "file") == Some(file))
                    .collect()
            };
            let (found, there) = match (on(&from).as_slice(), on(&to).as_slice()) {
                ([node], _) => (*node, false),
                ([], [node]) => (*node, true),
                ([], _) => {
                    return Err(LiveError::NoFormatNode {
                        disk: disk.name.clone(),
                        format,
                        from,
                    })
                }
                (several, _) => {
                    return Err(LiveError::Ambiguous {
                        disk: disk.name.clone(),
                        format,
                        from,
                        nodes: several
                            .iter()
                            .filter_map(|n| text(n, "node-name").map(str::to_owned))
                            .collect(),
                    })
                }
            };
            let node = text(found, "node-name").unwrap_or_default().to_owned();
            if let (Some(backing_file), None) = (text(found, "backing_file"), disk.backing) {
                return Err(LiveError::UndeclaredBacking {
                    disk: disk.name.clone(),
                    backing_file: backing_file.to_owned(),
                });
            }
            self.report.disks[i].node = Some(node.clone());
            if there {
                self.report.disks[i].outcome = DiskOutcome::AlreadyThere;
            }
            format_nodes.push((node, found.clone(), there));
        }
        for i in 0..self.disks.len() {
            let (node, info, there) = &format_nodes[i];
            if *there {
                continue;
            }
            let disk = &self.disks[i];
            let from = self.from(i);
            let protocols: &[&str] = match self.direction {
                Direction::Protect => &["file", "host_device"],
                Direction::Unprotect => &["nbd"],
            };
            let old_child = nodes
                .iter()
                .find(|n| {
                    text(n, "drv").is_some_and(|d| protocols.contains(&d))
                        && text(n, "file") == Some(from.as_str())
                })
                .and_then(|n| text(n, "node-name"))
                .ok_or_else(|| LiveError::NoProtocolNode {
                    disk: disk.name.clone(),
                    from: from.clone(),
                })?
                .to_owned();
            let prefix = match self.direction {
                Direction::Protect => "tm-nbd",
                Direction::Unprotect => "tm-file",
            };
            let mut new_child = format!("{prefix}-{i}");
            let mut n = 1;
            while taken.contains(&new_child) {
                new_child = format!("{prefix}-{i}-{n}");
                n += 1;
            }
            taken.push(new_child.clone());
            let add = match self.direction {
                Direction::Protect => json!({
                    "driver": "nbd",
                    "node-name": new_child,
                    "server": { "type": "unix", "path": self.socket.display().to_string() },
                    "export": disk.name,
                }),
                Direction::Unprotect => json!({
                    "driver": if disk.block_device { "host_device" } else { "file" },
                    "node-name": new_child,
                    "filename": disk.path.display().to_string(),
                }),
            };
            let read_only = info.get("ro").and_then(Value::as_bool).unwrap_or(false);
            let cache = info.get("cache").cloned().unwrap_or(Value::Null);
            let kept = json!({
                "ro": read_only,
                "detect_zeroes": info.get("detect_zeroes").cloned().unwrap_or("off".into()),
                "cache": cache,
            });
            let mut reopen = json!({
                "driver": disk.format.as_str(),
                "node-name": node,
                "file": new_child,
                "read-only": read_only,
                "detect-zeroes": kept["detect_zeroes"],
                "cache": {
                    "direct": cache.get("direct").and_then(Value::as_bool).unwrap_or(false),
                    "no-flush": cache.get("no-flush").and_then(Value::as_bool).unwrap_or(false),
                },
            });
            if !read_only {
                reopen["discard"] = "unmap".into();
            }
            if disk.format == ImageFormat::Qcow2 {
                reopen["backing"] = match disk.backing {
                    Some(b) => format_nodes[b].0.clone().into(),
                    None => Value::Null,
                };
            }
            self.steps[i] = Some(Step {
                node: node.clone(),
                old_child,
                new_child,
                add,
                reopen,
                kept,
            });
        }
        Ok(())
    }

    /// Sends the `blockdev-add` of the next step from `i`, or the reopen.
    fn next_add(&mut self, i: usize) {
        match (i..self.steps.len()).find(|&j| self.steps[j].is_some()) {
            Some(j) => {
                self.state = State::Adding(j);
                let add = self.steps[j]
                    .as_ref()
                    .map(|s| s.add.clone())
                    .unwrap_or_default();
                self.send("blockdev-add", add);
            }
            None if self.steps.iter().all(Option::is_none) => {
                // Every disk is there already.
                self.state = State::Verifying;
                self.send("query-named-block-nodes", json!({ "flat": true }));
            }
            None => {
                self.state = State::Reopening;
                let options: Vec<Value> = self
                    .steps
                    .iter()
                    .flatten()
                    .map(|s| s.reopen.clone())
                    .collect();
                self.send("blockdev-reopen", json!({ "options": options }));
            }
        }
    }

    /// Asks for the resync of the next disk from `i` (every disk moved,
    /// or every disk when `moved` is false: a protect in doubt), then
    /// goes on to remove the old nodes (or finishes, in doubt).
    fn next_resync(&mut self, i: usize, moved: bool) {
        let wanted =
            |j: usize| self.direction == Direction::Protect && (!moved || self.steps[j].is_some());
        match (i..self.disks.len()).find(|&j| wanted(j)) {
            Some(j) => {
                self.state = State::Resyncing(j, moved);
                self.outbox.push_back(Output::ResyncAll {
                    disk: self.disks[j].name.clone(),
                });
            }
            None if moved => self.next_remove(0),
            None => self.finish(),
        }
    }

    /// Sends the `blockdev-del` of the next old child from `i`, or the
    /// verifying query.
    fn next_remove(&mut self, i: usize) {
        match (i..self.steps.len()).find(|&j| self.steps[j].is_some()) {
            Some(j) => {
                self.state = State::Removing(j);
                let old = self.steps[j].as_ref().map(|s| s.old_child.clone());
                self.send("blockdev-del", json!({ "node-name": old }));
            }
            None => {
                self.state = State::Verifying;
                self.send("query-named-block-nodes", json!({ "flat": true }));
            }
        }
    }

    /// After a refusal: removes the nodes added for the steps before `i`
    /// (from the last), then ends (with resyncs when protecting).
    fn next_cleanup_before(&mut self, i: usize) {
        match (0..i).rev().find(|&j| self.steps[j].is_some()) {
            Some(j) => {
                self.state = State::CleaningUp(j);
                let new = self.steps[j].as_ref().map(|s| s.new_child.clone());
                self.send("blockdev-del", json!({ "node-name": new }));
            }
            None => self.end_with_resync(),
        }
    }

    /// Checks every moved disk reads its target with its options kept.
    fn verify(&mut self, nodes: &Value) -> Result<(), LiveError> {
        let nodes = node_list(nodes)?;
        for i in 0..self.disks.len() {
            let Some(node) = self.report.disks[i].node.clone() else {
                continue;
            };
            let found = nodes
                .iter()
                .find(|n| text(n, "node-name") == Some(node.as_str()));
            let file = found.and_then(|n| text(n, "file")).unwrap_or("nothing");
            let kept_ok = match (&self.steps[i], found) {
                (Some(step), Some(n)) => {
                    n.get("ro") == step.kept.get("ro")
                        && n.get("detect_zeroes") == step.kept.get("detect_zeroes")
                        && n.get("cache") == step.kept.get("cache")
                }
                _ => true,
            };
            let to = self.to(i);
            if file != to || !kept_ok {
                return Err(LiveError::Verify {
                    disk: self.disks[i].name.clone(),
                    expected: match &self.steps[i] {
                        Some(step) => format!("{to} with {}", step.kept),
                        None => to,
                    },
                    found: match found {
                        Some(n) => format!(
                            "{file} with {}",
                            json!({"ro": n.get("ro"), "detect_zeroes": n.get("detect_zeroes"), "cache": n.get("cache")})
                        ),
                        None => format!("no node {node}"),
                    },
                });
            }
        }
        Ok(())
    }

    /// After a reconnection: where is each disk that was to move?
    fn requeried(&mut self, nodes: &Value) {
        let nodes = match node_list(nodes) {
            Ok(nodes) => nodes,
            Err(e) => return self.fail(e, false),
        };
        let mut moved = 0;
        let mut stayed = 0;
        for i in 0..self.disks.len() {
            let Some(step) = &self.steps[i] else { continue };
            let file = nodes
                .iter()
                .find(|n| text(n, "node-name") == Some(step.node.as_str()))
                .and_then(|n| text(n, "file"));
            if file == Some(self.to(i).as_str()) {
                self.report.disks[i].outcome = DiskOutcome::Moved;
                moved += 1;
            } else {
                self.report.disks[i].outcome = DiskOutcome::NotMoved;
                stayed += 1;
            }
        }
        match (moved, stayed) {
            // Moved: what follows a reopen.
            (_, 0) if moved > 0 => self.next_resync(0, true),
            // Nothing moved (or nothing was to): remove what was added.
            (0, _) => {
                self.report.error.get_or_insert(LiveError::Lost);
                // The nodes that were added may or may not exist: a
                // refused removal is only a warning.
                self.next_cleanup_before(self.steps.len());
            }
            _ => self.fail(LiveError::Lost, false),
        }
    }

    fn fail_refused(&mut self, command: &'static str, refusal: Refusal) {
        self.report.error.get_or_insert(LiveError::Refused {
            command,
            class: refusal.class,
            desc: refusal.desc,
        });
    }

    /// Records `error`; `moved`: the disks moved (the verification
    /// failed): they are resynced and the old nodes stay removed.
    fn fail(&mut self, error: LiveError, moved: bool) {
        self.report.error.get_or_insert(error);
        if moved {
            self.finish();
        } else {
            self.end_with_resync();
        }
    }

    /// Ends a failed or uncertain move: when protecting, every disk is
    /// recorded as resync-needed (its file may have been written around
    /// the tracker).
    fn end_with_resync(&mut self) {
        self.next_resync(0, false);
    }

    fn finish(&mut self) {
        self.state = State::Done;
        self.outbox.push_back(Output::Done(self.report.clone()));
    }
}

/// The list in a `query-named-block-nodes` answer.
fn node_list(nodes: &Value) -> Result<&Vec<Value>, LiveError> {
    nodes.as_array().ok_or_else(|| LiveError::Unexpected {
        command: "query-named-block-nodes",
        answer: nodes.to_string(),
    })
}

fn text<'a>(node: &'a Value, key: &str) -> Option<&'a str> {
    node.get(key).and_then(Value::as_str)
}

/// How [`run`] failed before anything was done.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the move")]
pub struct StartError(#[source] pub QmpError);

/// Moves the disks over qemu's monitor at `qmp_socket` (answers awaited
/// at most `timeout`; one new connection is tried when it is lost),
/// recording resyncs with `resync_all(disk)`.
pub fn run(
    qmp_socket: &Path,
    mut core: LiveMove,
    timeout: Duration,
    mut resync_all: impl FnMut(&str) -> Result<(), Box<dyn std::error::Error + Send + Sync>>,
) -> Result<MoveReport, StartError> {
    let mut qmp = Qmp::connect(qmp_socket, timeout).map_err(StartError)?;
    let mut reconnected = false;
    loop {
        match core.poll() {
            Some(Output::Command { execute, arguments }) => {
                let mut events = Vec::new();
                let reply = qmp.execute(execute, Some(&arguments), &mut |name, data| {
                    events.push((name.to_owned(), data.clone()))
                });
                for (name, data) in &events {
                    core.handle_event(name, data);
                }
                match reply {
                    Ok(value) => core.handle_reply(Ok(value)),
                    Err(QmpError::Refused { class, desc, .. }) => {
                        core.handle_reply(Err(Refusal { class, desc }))
                    }
                    Err(_) if !reconnected => match Qmp::connect(qmp_socket, timeout) {
                        Ok(again) => {
                            reconnected = true;
                            qmp = again;
                            core.handle_reconnected();
                        }
                        Err(_) => core.handle_gone(),
                    },
                    Err(_) => core.handle_gone(),
                }
            }
            Some(Output::ResyncAll { disk }) => core.handle_resync(resync_all(&disk)),
            Some(Output::Done(report)) => return Ok(report),
            // Every state leaves something in the outbox until Done.
            None => {
                core.handle_gone();
                if core.outbox.is_empty() {
                    return Ok(core.report);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCK: &str = "/run/tidemark/web1.nbd.sock";

    /// A qcow2 root on a qcow2 base and a raw data disk on a block device.
    fn disks() -> Vec<LiveDisk> {
        vec![
            LiveDisk {
                name: "root".into(),
                path: "/img/root.qcow2".into(),
                block_device: false,
                format: ImageFormat::Qcow2,
                backing: Some(1),
            },
            LiveDisk {
                name: "base".into(),
                path: "/img/base.qcow2".into(),
                block_device: false,
                format: ImageFormat::Qcow2,
                backing: None,
            },
            LiveDisk {
                name: "data".into(),
                path: "/dev/vdb".into(),
                block_device: true,
                format: ImageFormat::Raw,
                backing: None,
            },
        ]
    }

    fn node(name: &str, drv: &str, file: &str, ro: bool) -> Value {
        json!({
            "node-name": name, "drv": drv, "file": file, "ro": ro,
            "detect_zeroes": "off",
            "cache": {"no-flush": false, "direct": false, "writeback": true},
        })
    }

    /// The VM's nodes with each disk on `files[i]` (its path or its URL).
    fn nodes(files: [&str; 3], protocol: [(&str, &str); 3]) -> Value {
        let mut root = node("disk0", "qcow2", files[0], false);
        root["backing_file"] = "/img/base.qcow2".into();
        json!([
            root,
            node(protocol[0].0, protocol[0].1, files[0], false),
            node("disk1", "qcow2", files[1], true),
            node(protocol[1].0, protocol[1].1, files[1], false),
            node("disk2", "raw", files[2], false),
            node(protocol[2].0, protocol[2].1, files[2], false),
        ])
    }

    fn on_files() -> Value {
        nodes(
            ["/img/root.qcow2", "/img/base.qcow2", "/dev/vdb"],
            [("f0", "file"), ("f1", "file"), ("f2", "host_device")],
        )
    }

    fn url(export: &str) -> String {
        nbd_url(Path::new(SOCK), export)
    }

    fn on_tracker() -> Value {
        let (a, b, c) = (url("root"), url("base"), url("data"));
        nodes(
            [&a, &b, &c],
            [
                ("tm-nbd-0", "nbd"),
                ("tm-nbd-1", "nbd"),
                ("tm-nbd-2", "nbd"),
            ],
        )
    }

    fn command(mv: &mut LiveMove) -> (&'static str, Value) {
        match mv.poll() {
            Some(Output::Command { execute, arguments }) => (execute, arguments),
            other => panic!("expected a command, got {other:?}"),
        }
    }

    fn expect(mv: &mut LiveMove, execute: &str) -> Value {
        let (got, arguments) = command(mv);
        assert_eq!(got, execute, "{arguments}");
        assert_eq!(mv.poll(), None, "one command at a time");
        arguments
    }

    fn ok(mv: &mut LiveMove) {
        mv.handle_reply(Ok(json!({})));
    }

    fn refused(mv: &mut LiveMove, desc: &str) {
        mv.handle_reply(Err(Refusal {
            class: "GenericError".into(),
            desc: desc.into(),
        }));
    }

    fn resyncs(mv: &mut LiveMove) -> Vec<String> {
        let mut disks = Vec::new();
        while let Some(Output::ResyncAll { disk }) = mv.outbox.front().cloned() {
            mv.poll();
            disks.push(disk);
            mv.handle_resync(Ok(()));
        }
        disks
    }

    fn done(mv: &mut LiveMove) -> MoveReport {
        match mv.poll() {
            Some(Output::Done(report)) => report,
            other => panic!("expected the end, got {other:?}"),
        }
    }

    /// Drives a protect from a successful reopen to its end, the last
    /// query answered with `nodes`.
    fn after_reopen(mv: &mut LiveMove, nodes: Value) -> MoveReport {
        assert_eq!(resyncs(mv).len(), 3);
        for _ in 0..3 {
            expect(mv, "blockdev-del");
            ok(mv);
        }
        expect(mv, "query-named-block-nodes");
        mv.handle_reply(Ok(nodes));
        done(mv)
    }

    /// Drives a protect up to the reopen; returns its arguments.
    fn up_to_reopen(mv: &mut LiveMove) -> Value {
        expect(mv, "query-named-block-nodes");
        mv.handle_reply(Ok(on_files()));
        for _ in 0..3 {
            expect(mv, "blockdev-add");
            ok(mv);
        }
        let (execute, reopen) = command(mv);
        assert_eq!(execute, "blockdev-reopen");
        reopen
    }

    #[test]
    fn a_protect_reopens_every_disk_at_once_then_resyncs_removes_and_verifies() {
        let mut mv = LiveMove::new(Direction::Protect, Path::new(SOCK), disks());
        expect(&mut mv, "query-named-block-nodes");
        mv.handle_reply(Ok(on_files()));
        let add = expect(&mut mv, "blockdev-add");
        assert_eq!(
            add,
            json!({"driver": "nbd", "node-name": "tm-nbd-0",
                   "server": {"type": "unix", "path": SOCK}, "export": "root"})
        );
        ok(&mut mv);
        expect(&mut mv, "blockdev-add");
        ok(&mut mv);
        expect(&mut mv, "blockdev-add");
        ok(&mut mv);
        let reopen = expect(&mut mv, "blockdev-reopen");
        let cache = json!({"direct": false, "no-flush": false});
        assert_eq!(
            reopen,
            json!({"options": [
                {"driver": "qcow2", "node-name": "disk0", "file": "tm-nbd-0", "backing": "disk1",
                 "read-only": false, "detect-zeroes": "off", "cache": cache, "discard": "unmap"},
                {"driver": "qcow2", "node-name": "disk1", "file": "tm-nbd-1", "backing": null,
                 "read-only": true, "detect-zeroes": "off", "cache": cache},
                {"driver": "raw", "node-name": "disk2", "file": "tm-nbd-2",
                 "read-only": false, "detect-zeroes": "off", "cache": cache, "discard": "unmap"},
            ]})
        );
        ok(&mut mv);
        assert_eq!(resyncs(&mut mv), ["root", "base", "data"]);
        for old in ["f0", "f1", "f2"] {
            assert_eq!(mv.outbox.len(), 1);
            let del = expect(&mut mv, "blockdev-del");
            assert_eq!(del, json!({"node-name": old}));
            ok(&mut mv);
        }
        expect(&mut mv, "query-named-block-nodes");
        mv.handle_reply(Ok(on_tracker()));
        let report = done(&mut mv);
        assert_eq!(report.error, None);
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
        for (disk, name) in report.disks.iter().zip(["root", "base", "data"]) {
            assert_eq!(disk.outcome, DiskOutcome::Moved);
            assert!(disk.resync_recorded);
            assert_eq!(disk.to, url(name));
        }
        assert_eq!(report.disks[2].removed_node.as_deref(), Some("f2"));
    }

    #[test]
    fn a_refused_reopen_removes_the_added_nodes_and_resyncs_every_disk() {
        let mut mv = LiveMove::new(Direction::Protect, Path::new(SOCK), disks());
        up_to_reopen(&mut mv);
        refused(&mut mv, "Cannot change the option 'driver'");
        for added in ["tm-nbd-2", "tm-nbd-1", "tm-nbd-0"] {
            let del = expect(&mut mv, "blockdev-del");
            assert_eq!(del, json!({"node-name": added}));
            ok(&mut mv);
        }
        assert_eq!(resyncs(&mut mv), ["root", "base", "data"]);
        let report = done(&mut mv);
        assert!(
            matches!(&report.error, Some(LiveError::Refused { command: "blockdev-reopen", desc, .. })
                if desc.contains("driver")),
            "{:?}",
            report.error
        );
        assert!(report
            .disks
            .iter()
            .all(|d| d.outcome == DiskOutcome::NotMoved && d.resync_recorded));
    }

    #[test]
    fn a_refused_add_removes_only_the_nodes_added_before() {
        let mut mv = LiveMove::new(Direction::Protect, Path::new(SOCK), disks());
        expect(&mut mv, "query-named-block-nodes");
        mv.handle_reply(Ok(on_files()));
        expect(&mut mv, "blockdev-add");
        ok(&mut mv);
        expect(&mut mv, "blockdev-add");
        refused(&mut mv, "Requested export not available");
        assert_eq!(
            expect(&mut mv, "blockdev-del"),
            json!({"node-name": "tm-nbd-0"})
        );
        refused(&mut mv, "Failed to find node");
        assert_eq!(resyncs(&mut mv).len(), 3);
        let report = done(&mut mv);
        assert!(matches!(
            report.error,
            Some(LiveError::Refused {
                command: "blockdev-add",
                ..
            })
        ));
        assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    }

    #[test]
    fn an_event_before_the_reply_is_reported_and_the_reply_still_counts() {
        let mut mv = LiveMove::new(Direction::Protect, Path::new(SOCK), disks());
        up_to_reopen(&mut mv);
        mv.handle_event(
            "BLOCK_IO_ERROR",
            &json!({"device": "", "node-name": "disk2"}),
        );
        mv.handle_event("RESUME", &Value::Null);
        ok(&mut mv);
        let report = after_reopen(&mut mv, on_tracker());
        assert_eq!(report.error, None);
        assert_eq!(report.warnings.len(), 1);
        assert!(report.warnings[0].contains("BLOCK_IO_ERROR"));
    }

    #[test]
    fn a_lost_connection_is_followed_by_a_query_of_where_the_disks_are() {
        // Lost after the reopen was sent, and it had happened.
        let mut mv = LiveMove::new(Direction::Protect, Path::new(SOCK), disks());
        up_to_reopen(&mut mv);
        mv.handle_reconnected();
        expect(&mut mv, "query-named-block-nodes");
        let mut moved = on_tracker();
        // The old children are still there.
        for (i, f) in ["f0", "f1", "f2"].iter().enumerate() {
            moved[2 * i + 1]["node-name"] = (*f).into();
        }
        mv.handle_reply(Ok(moved));
        let report = after_reopen(&mut mv, on_tracker());
        assert_eq!(report.error, None);
        assert!(report.disks.iter().all(|d| d.outcome == DiskOutcome::Moved));

        // Lost, and the reopen had not happened.
        let mut mv = LiveMove::new(Direction::Protect, Path::new(SOCK), disks());
        up_to_reopen(&mut mv);
        mv.handle_reconnected();
        expect(&mut mv, "query-named-block-nodes");
        mv.handle_reply(Ok(on_files()));
        for _ in 0..3 {
            expect(&mut mv, "blockdev-del");
            ok(&mut mv);
        }
        assert_eq!(resyncs(&mut mv).len(), 3);
        let report = done(&mut mv);
        assert_eq!(report.error, Some(LiveError::Lost));
        assert!(report
            .disks
            .iter()
            .all(|d| d.outcome == DiskOutcome::NotMoved));

        // Lost while planning: the plan's query again.
        let mut mv = LiveMove::new(Direction::Protect, Path::new(SOCK), disks());
        expect(&mut mv, "query-named-block-nodes");
        mv.handle_reconnected();
        expect(&mut mv, "query-named-block-nodes");
        mv.handle_reply(Ok(on_files()));
        expect(&mut mv, "blockdev-add");
    }

    #[test]
    fn a_monitor_gone_for_good_leaves_the_disks_unknown_and_resynced() {
        let mut mv = LiveMove::new(Direction::Protect, Path::new(SOCK), disks());
        up_to_reopen(&mut mv);
        mv.handle_gone();
        assert_eq!(resyncs(&mut mv).len(), 3);
        let report = done(&mut mv);
        assert_eq!(report.error, Some(LiveError::Lost));
        assert!(report
            .disks
            .iter()
            .all(|d| d.outcome == DiskOutcome::Unknown));
    }

    #[test]
    fn an_unprotect_puts_the_files_back_without_a_resync() {
        let mut mv = LiveMove::new(Direction::Unprotect, Path::new(SOCK), disks());
        expect(&mut mv, "query-named-block-nodes");
        mv.handle_reply(Ok(on_tracker()));
        let add = expect(&mut mv, "blockdev-add");
        assert_eq!(
            add,
            json!({"driver": "file", "node-name": "tm-file-0", "filename": "/img/root.qcow2"})
        );
        ok(&mut mv);
        expect(&mut mv, "blockdev-add");
        ok(&mut mv);
        let add = expect(&mut mv, "blockdev-add");
        assert_eq!(add["driver"], "host_device");
        ok(&mut mv);
        let reopen = expect(&mut mv, "blockdev-reopen");
        assert_eq!(reopen["options"][0]["file"], "tm-file-0");
        ok(&mut mv);
        for old in ["tm-nbd-0", "tm-nbd-1", "tm-nbd-2"] {
            assert_eq!(expect(&mut mv, "blockdev-del"), json!({"node-name": old}));
            ok(&mut mv);
        }
        expect(&mut mv, "query-named-block-nodes");
        mv.handle_reply(Ok(on_files()));
        let report = done(&mut mv);
        assert_eq!(report.error, None);
        assert!(report
            .disks
            .iter()
            .all(|d| d.outcome == DiskOutcome::Moved && !d.resync_recorded));
    }

    #[test]
    fn disks_already_there_are_only_verified() {
        let mut mv = LiveMove::new(Direction::Protect, Path::new(SOCK), disks());
        expect(&mut mv, "query-named-block-nodes");
        mv.handle_reply(Ok(on_tracker()));
        expect(&mut mv, "query-named-block-nodes");
        mv.handle_reply(Ok(on_tracker()));
        let report = done(&mut mv);
        assert_eq!(report.error, None);
        assert!(report
            .disks
            .iter()
            .all(|d| d.outcome == DiskOutcome::AlreadyThere));
    }

    #[test]
    fn a_vm_that_is_not_the_specs_or_hides_a_backing_file_is_refused() {
        let mut mv = LiveMove::new(Direction::Protect, Path::new(SOCK), disks());
        expect(&mut mv, "query-named-block-nodes");
        let mut other = on_files();
        other[4]["file"] = "/img/other.raw".into();
        mv.handle_reply(Ok(other));
        assert_eq!(resyncs(&mut mv).len(), 3);
        let report = done(&mut mv);
        assert!(
            matches!(&report.error, Some(LiveError::NoFormatNode { disk, .. }) if disk == "data"),
            "{:?}",
            report.error
        );
        assert!(report
            .disks
            .iter()
            .all(|d| d.outcome == DiskOutcome::NotMoved));

        let mut undeclared = disks();
        undeclared[0].backing = None;
        let mut mv = LiveMove::new(Direction::Unprotect, Path::new(SOCK), undeclared);
        expect(&mut mv, "query-named-block-nodes");
        mv.handle_reply(Ok(on_tracker()));
        let report = done(&mut mv);
        assert!(
            matches!(&report.error, Some(LiveError::UndeclaredBacking { disk, .. }) if disk == "root"),
            "{:?}",
            report.error
        );
    }

    #[test]
    fn a_node_that_changed_options_in_the_reopen_fails_the_verification() {
        let mut mv = LiveMove::new(Direction::Protect, Path::new(SOCK), disks());
        up_to_reopen(&mut mv);
        ok(&mut mv);
        let mut changed = on_tracker();
        changed[4]["cache"]["direct"] = true.into();
        let report = after_reopen(&mut mv, changed);
        assert!(
            matches!(&report.error, Some(LiveError::Verify { disk, .. }) if disk == "data"),
            "{:?}",
            report.error
        );
    }
}
