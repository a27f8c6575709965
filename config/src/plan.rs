//! Recovery plans: which protected hosts' groups fail over, in which
//! order, with which hooks and manual pauses. A plan is its own file,
//! read by `tidemark plan run` on the replica site:
//!
//! ```toml
//! [plan]
//! data-dir = "/var/lib/tidemark/replicas"
//! to = "/srv/failover"
//!
//! [[plan.step]]
//! name = "databases"
//! groups = ["db1.example.com", "db2.example.com/orders"]
//! post = ["/usr/local/bin/check-db"]
//! pause = "check the databases before the application tier starts"
//!
//! [[plan.step]]
//! name = "applications"
//! groups = ["app1.example.com"]
//!
//! [[plan.step]]                  # a VM: its group is named after it
//! name = "web"
//! groups = ["hv1.example.com/web1"]
//! start-vm = { up-agent = true, up-timeout = "5m" }   # the replicated spec
//!
//! [plan.networks]                # the VMs' networks on this site's bridges
//! br0 = "br-dr0"
//! ```

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};
use tidemark_names::{Name, NameError};

use crate::error::{ConfigError, FieldPath};
use crate::rules;
use crate::Duration;

/// The top level of a plan file.
#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    expecting = "a document with a [plan] table"
)]
pub(crate) struct PlanDocument {
    pub(crate) plan: PlanConfig,
}

/// A recovery plan, the `[plan]` table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    expecting = "a [plan] table"
)]
pub struct PlanConfig {
    /// What the plan is for, shown when it runs. Default: empty.
    #[serde(default)]
    pub description: String,

    /// The receiver's data directory. Default: `/var/lib/tidemark/replicas`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,

    /// The receiver's configuration file: with it, the groups are taken
    /// over from the store its `[receiver.store]` selects (the Ceph store,
    /// from any receiver node; the commands get `--config` instead of
    /// `--data-dir`). Spans are read from `data-dir` all the same.
    /// Default: not set (the local store in `data-dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiver_config: Option<PathBuf>,

    /// Where a failover writes the images: `<to>/<host>/<group>/<disk>.img`.
    /// Default: `/var/lib/tidemark/failover`.
    #[serde(default = "default_to")]
    pub to: PathBuf,

    /// The recovery point of an unplanned failover or a test: `latest`, a
    /// sequence number, a time or a marker label (a planned failover
    /// always uses the final barrier). Default: `"latest"`.
    #[serde(default = "default_point")]
    pub point: String,

    /// Where a test serves each group's point: `<dir>/<host>-<group>.sock`.
    /// Default: `/run/tidemark/test-failover`.
    #[serde(default = "default_test_socket_dir")]
    pub test_socket_dir: PathBuf,

    /// Most time one hook may run; it is killed after. Default: `"10m"`.
    #[serde(default = "default_hook_timeout")]
    pub hook_timeout: Duration,

    /// Most time a planned failover waits for a host to drain.
    /// Default: `"10m"`.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Duration,

    /// The bridge of this site for each network of the VMs' specs (a
    /// NIC's `bridge` or `network` name), `NAME = "BRIDGE"`, used by the
    /// steps with `start-vm` at a failover (a test failover's VMs are
    /// isolated instead). Default: none.
    #[serde(default)]
    pub networks: std::collections::BTreeMap<String, String>,

    /// The steps, in order, one `[[plan.step]]` table each. Required.
    #[serde(rename = "step", deserialize_with = "step_tables")]
    pub steps: Vec<PlanStep>,
}

/// One step of a plan: its groups fail over one after the other, between
/// its pre- and post-hooks, then the plan pauses if asked to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PlanStep {
    /// Shown in the plan's output and given to hooks. Required.
    pub name: String,

    /// The protected hosts' groups, `"host"` (group `default`) or
    /// `"host/group"`. At least one, unless the step names a span.
    #[serde(default)]
    pub groups: Vec<GroupRef>,

    /// A span (a `[[receiver.span]]` name) instead of groups: every
    /// member fails over (or is tested) at the same span point, the
    /// plan's `point` (`latest` or a span point's id). Not with `groups`
    /// nor `start-vm`; a plan with a span step runs unplanned or as a
    /// test. Default: none.
    #[serde(default)]
    pub span: Option<Name>,

    /// Shell commands run before the step's failovers, in order; one that
    /// fails stops the plan. Default: none.
    #[serde(default)]
    pub pre: Vec<String>,

    /// Shell commands run after the step's failovers. Default: none.
    #[serde(default)]
    pub post: Vec<String>,

    /// A manual pause after the step: the text is shown and the plan waits
    /// for Enter (end of input aborts the plan). Default: no pause.
    #[serde(default)]
    pub pause: Option<String>,

    /// Start each group's VM once its disks are failed over (or served,
    /// in a test) and wait until it is up, before the post-hooks; a VM not
    /// up in time stops the plan. Default: no VM is started.
    #[serde(default)]
    pub start_vm: Option<StartVm>,
}

/// The "start VM, wait until it is up" of a step (see
/// [`PlanStep::start_vm`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StartVm {
    /// A directory of VM spec files: a group's VM is
    /// `<specs>/<group>.toml`. Default: none, each group's VM is the spec
    /// its protected site replicated, as of the point failed over to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub specs: Option<PathBuf>,

    /// The VM is up when a line of its serial console contains this.
    /// Default: as `tidemark failover --boot`: the guest agent answering
    /// when the spec names one (`guest-agent`), else `"login:"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_line: Option<String>,

    /// The VM is up when its guest agent answers (not with `up-line`).
    /// Default: `false` (see `up-line`).
    #[serde(default)]
    pub up_agent: bool,

    /// Most time from starting a VM to it being up. Default: `"5m"`.
    #[serde(default = "default_up_timeout")]
    pub up_timeout: Duration,
}

fn default_up_timeout() -> Duration {
    Duration::from_secs(300)
}

/// A protected host's consistency group, written `"host"` or
/// `"host/group"`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GroupRef {
    /// The host's enrolled name.
    pub host: Name,
    /// The consistency group.
    pub group: Name,
}

impl fmt::Display for GroupRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.host, self.group)
    }
}

impl std::str::FromStr for GroupRef {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, NameError> {
        let (host, group) = s.split_once('/').unwrap_or((s, "default"));
        Ok(GroupRef {
            host: host.parse()?,
            group: group.parse()?,
        })
    }
}

impl<'de> Deserialize<'de> for GroupRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e: NameError| {
            serde::de::Error::custom(format!("{s:?} is not \"host\" or \"host/group\": {e}"))
        })
    }
}

impl Serialize for GroupRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn step_tables<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PlanStep>, D::Error> {
    crate::table_list::deserialize(d, "plan.step")
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/tidemark/replicas")
}

fn default_to() -> PathBuf {
    PathBuf::from("/var/lib/tidemark/failover")
}

fn default_point() -> String {
    "latest".to_string()
}

fn default_test_socket_dir() -> PathBuf {
    PathBuf::from("/run/tidemark/test-failover")
}

fn default_hook_timeout() -> Duration {
    Duration::from_secs(600)
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(600)
}

impl PlanConfig {
    /// Checks what the types cannot: at least one step, each with groups,
    /// no group twice in the plan, usable paths and timeouts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let at = FieldPath::root().key("plan");
        let invalid = |field: FieldPath, message: String| ConfigError::invalid(field, message);
        rules::check_path(&self.data_dir).map_err(|m| invalid(at.key("data-dir"), m))?;
        if let Some(config) = &self.receiver_config {
            rules::check_path(config).map_err(|m| invalid(at.key("receiver-config"), m))?;
        }
        rules::check_path(&self.to).map_err(|m| invalid(at.key("to"), m))?;
        rules::check_path(&self.test_socket_dir)
            .map_err(|m| invalid(at.key("test-socket-dir"), m))?;
        if self.point.trim().is_empty() {
            return Err(invalid(at.key("point"), "point must not be empty".into()));
        }
        for (key, d) in [
            ("hook-timeout", self.hook_timeout),
            ("drain-timeout", self.drain_timeout),
        ] {
            if d.get().is_zero() {
                return Err(invalid(at.key(key), format!("{key} must be more than 0s")));
            }
        }
        if self.steps.is_empty() {
            return Err(invalid(
                at.key("step"),
                "a plan needs at least one [[plan.step]]".into(),
            ));
        }
        let mut seen: Vec<(&GroupRef, usize)> = Vec::new();
        for (i, step) in self.steps.iter().enumerate() {
            let s = at.key("step").index(i);
            if step.name.trim().is_empty() {
                return Err(invalid(s.key("name"), "a step needs a name".into()));
            }
            if let Some(span) = &step.span {
                if !step.groups.is_empty() {
                    return Err(invalid(
                        s.key("span"),
                        format!(
                            "step {:?} names groups and span {span}: a span step fails every member over, give one or the other",
                            step.name
                        ),
                    ));
                }
                if step.start_vm.is_some() {
                    return Err(invalid(
                        s.key("start-vm"),
                        "start-vm boots one group's VM: not in a span step".into(),
                    ));
                }
                if self.point != "latest" && self.point.parse::<u64>().is_err() {
                    return Err(invalid(
                        at.key("point"),
                        format!(
                            "step {:?} names span {span}: the point must be `latest` or a span point's id",
                            step.name
                        ),
                    ));
                }
                if let Some(first) = self.steps[..i]
                    .iter()
                    .find(|o| o.span.as_ref() == Some(span))
                {
                    return Err(invalid(
                        s.key("span"),
                        format!(
                            "span {span} is already in step {:?}: a span fails over once",
                            first.name
                        ),
                    ));
                }
            } else if step.groups.is_empty() {
                return Err(invalid(
                    s.key("groups"),
                    format!("step {:?} names no group (nor a span)", step.name),
                ));
            }
            for g in &step.groups {
                if let Some((_, first)) = seen.iter().find(|(other, _)| *other == g) {
                    return Err(invalid(
                        s.key("groups"),
                        format!(
                            "{g} is already in step {:?}: a group fails over once",
                            self.steps[*first].name
                        ),
                    ));
                }
                seen.push((g, i));
            }
            for (key, hooks) in [("pre", &step.pre), ("post", &step.post)] {
                if hooks.iter().any(|h| h.trim().is_empty()) {
                    return Err(invalid(s.key(key), "an empty hook command".into()));
                }
            }
            if let Some(vm) = &step.start_vm {
                let v = s.key("start-vm");
                if let Some(specs) = &vm.specs {
                    rules::check_path(specs).map_err(|m| invalid(v.key("specs"), m))?;
                }
                if vm.up_line.as_ref().is_some_and(|l| l.trim().is_empty()) {
                    return Err(invalid(
                        v.key("up-line"),
                        "up-line must not be empty: every console line would say the VM is up"
                            .into(),
                    ));
                }
                if vm.up_line.is_some() && vm.up_agent {
                    return Err(invalid(
                        v.key("up-agent"),
                        "up-agent and up-line are two ways to see the VM up: give one".into(),
                    ));
                }
                if vm.up_timeout.get().is_zero() {
                    return Err(invalid(
                        v.key("up-timeout"),
                        "up-timeout must be more than 0s".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::parse_plan;
    use std::path::Path;

    #[test]
    fn a_plan_reads_with_defaults_and_groups_default_to_the_default_group() {
        let plan = parse_plan(
            r#"
[plan]
to = "/srv/failover"

[[plan.step]]
name = "db"
groups = ["db1.example.com", "db2/orders"]
pre = ["true"]
pause = "check"

[[plan.step]]
name = "app"
groups = ["app1"]
"#,
            Path::new("p.toml"),
        )
        .unwrap();
        assert_eq!(plan.steps.len(), 2);
        assert_eq!(
            plan.steps[0].groups[0].to_string(),
            "db1.example.com/default"
        );
        assert_eq!(plan.steps[0].groups[1].to_string(), "db2/orders");
        assert_eq!(plan.steps[0].pause.as_deref(), Some("check"));
        assert_eq!(plan.point, "latest");
        assert_eq!(plan.data_dir, Path::new("/var/lib/tidemark/replicas"));
        assert_eq!(plan.hook_timeout.get().as_secs(), 600);
    }

    #[test]
    fn plan_mistakes_are_named_with_file_line_and_setting() {
        let err = |text: &str| {
            parse_plan(text, Path::new("p.toml"))
                .unwrap_err()
                .to_string()
        };
        let e = err("[plan]\n[[plan.step]]\nname = \"a\"\ngroups = [\"a/b/c\"]\n");
        assert!(e.starts_with("p.toml:4:"), "{e}");
        assert!(e.contains("not \"host\" or \"host/group\""), "{e}");
        let e = err("[plan]\n[[plan.step]]\nname = \"a\"\ngroups = [\"h\"]\n[[plan.step]]\nname = \"b\"\ngroups = [\"h/default\"]\n");
        assert!(e.contains("plan.step[1].groups"), "{e}");
        assert!(e.contains("already in step \"a\""), "{e}");
        let e = err("[plan]\nto = \"/x\"\n");
        assert!(e.contains("missing field `step`"), "{e}");
        let e = err("[plan]\n[plan.step]\nname = \"a\"\ngroups = [\"h\"]\n");
        assert!(e.contains("double brackets"), "{e}");
        let e = err("[plan]\n[[plan.step]]\nname = \"a\"\ngroups = []\n");
        assert!(e.contains("names no group"), "{e}");
        let e = err("[plan]\n[[plan.step]]\nname = \"a\"\ngroups = [\"h\"]\npuase = \"x\"\n");
        assert!(e.contains("unknown field `puase`"), "{e}");
    }

    #[test]
    fn a_step_may_name_a_span_instead_of_groups() {
        let plan = parse_plan(
            "[plan]\npoint = \"12\"\n[[plan.step]]\nname = \"shop\"\nspan = \"shop\"\n",
            Path::new("p.toml"),
        )
        .unwrap();
        assert_eq!(
            plan.steps[0].span.as_ref().map(|n| n.as_str()),
            Some("shop")
        );
        assert!(plan.steps[0].groups.is_empty());
        let err = |text: &str| {
            parse_plan(text, Path::new("p.toml"))
                .unwrap_err()
                .to_string()
        };
        let step = "[[plan.step]]\nname = \"a\"\nspan = \"shop\"\n";
        let e = err(&format!("[plan]\n{step}groups = [\"h\"]\n"));
        assert!(e.contains("plan.step[0].span"), "{e}");
        let e = err(&format!("[plan]\npoint = \"before-upgrade\"\n{step}"));
        assert!(e.contains("a span point's id"), "{e}");
        let e = err(&format!("[plan]\n{step}start-vm = {{ specs = \"/v\" }}\n"));
        assert!(e.contains("not in a span step"), "{e}");
        let e = err(&format!(
            "[plan]\n{step}[[plan.step]]\nname = \"b\"\nspan = \"shop\"\n"
        ));
        assert!(e.contains("already in step \"a\""), "{e}");
    }

    #[test]
    fn a_step_may_start_its_vms_and_wait_until_they_are_up() {
        let step = "[plan]\n[plan.networks]\nbr0 = \"br-dr0\"\n\
                    [[plan.step]]\nname = \"web\"\ngroups = [\"hv1/web1\"]\n";
        let plan = parse_plan(
            &format!("{step}start-vm = {{ specs = \"/etc/tidemark/vms\" }}\n"),
            Path::new("p.toml"),
        )
        .unwrap();
        let vm = plan.steps[0].start_vm.as_ref().unwrap();
        assert_eq!(vm.specs.as_deref(), Some(Path::new("/etc/tidemark/vms")));
        assert_eq!(vm.up_line, None);
        assert!(!vm.up_agent);
        assert_eq!(vm.up_timeout.get().as_secs(), 300);
        assert_eq!(plan.networks["br0"], "br-dr0");
        let err = |line: &str| {
            parse_plan(&format!("{step}{line}\n"), Path::new("p.toml"))
                .unwrap_err()
                .to_string()
        };
        let e = err("start-vm = { specs = \"/v\", up-line = \" \" }");
        assert!(e.contains("plan.step[0].start-vm.up-line"), "{e}");
        let e = err("start-vm = { up-agent = true, up-line = \"login:\" }");
        assert!(e.contains("plan.step[0].start-vm.up-agent"), "{e}");
        assert!(e.contains("give one"), "{e}");
        let e = err("start-vm = { specs = \"/v\", up-timeout = \"0s\" }");
        assert!(e.contains("up-timeout must be more than 0s"), "{e}");
        let e = err("start-vm = { specs = \"/v\", timeout = \"1m\" }");
        assert!(e.contains("unknown field `timeout`"), "{e}");
        let e = err("start-vm = { specs = \"\" }");
        assert!(e.contains("plan.step[0].start-vm.specs"), "{e}");
        // Without specs: the replicated spec.
        let plan = parse_plan(&format!("{step}start-vm = {{}}\n"), Path::new("p.toml")).unwrap();
        assert_eq!(plan.steps[0].start_vm.as_ref().unwrap().specs, None);
    }
}
