//! The shared behaviour tests (`behaviour/`) on the simulated cluster.

mod behaviour;

use behaviour::Harness;
use std::time::Duration;
use tidemark_ceph::{SimCluster, SimWorld};

struct Sim(SimWorld);

impl Harness for Sim {
    type C = SimCluster;

    fn client(&self) -> SimCluster {
        self.0.client("test")
    }

    fn wait_past(&self, d: Duration) {
        self.0.advance(d + Duration::from_millis(1));
    }

    fn lease(&self) -> Duration {
        Duration::from_secs(15)
    }
}

#[test]
fn write_ops() {
    behaviour::write_ops(&Sim(SimWorld::new()));
}

#[test]
fn locks() {
    behaviour::locks(&Sim(SimWorld::new()));
}

#[test]
fn blocklist() {
    behaviour::blocklist(&Sim(SimWorld::new()));
}

#[test]
fn images() {
    behaviour::images(&Sim(SimWorld::new()));
}
