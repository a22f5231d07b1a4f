//! Network namespaces as separate machines, for tests that cross a network.
//!
//! One "switch" namespace holds a bridge; every other namespace ("node") gets a veth pair
//! whose outer end is a port of that bridge and whose inner end is `eth0` with one address
//! of the test subnet. No namespace has a default route, so nothing a test sends can leave
//! the machine, and the root namespace never addresses a node (every client runs inside a
//! node through `ip netns exec`). [`Fabric`] removes every namespace it made, and kills what
//! runs in them, when it is dropped, also when the test panics; namespaces left by a test
//! process that died are removed by the next [`Fabric::create`].

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Prefix of every namespace these tests make.
const PREFIX: &str = "hgt";

/// A set of namespaces joined by one bridge.
pub struct Fabric {
    /// `hgt<pid>`: the prefix of this run's namespaces.
    pub tag: String,
    /// Node roles in creation order, with their addresses.
    pub nodes: Vec<(String, String)>,
    /// Made by this process (removed on drop), or [`Fabric::attach`]ed to.
    owned: bool,
}

/// Run `ip` with `args`; panics with its stderr when it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| panic!("ip {args:?}: {e} (install iproute2)"));
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
}

fn namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().map(|o| o.stdout).unwrap_or_default();
    String::from_utf8_lossy(&out).lines().filter_map(|l| l.split_whitespace().next().map(String::from)).collect()
}

fn pids_in(ns: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "pids", ns]).output().map(|o| o.stdout).unwrap_or_default();
    String::from_utf8_lossy(&out).split_whitespace().map(String::from).collect()
}

/// Kill everything running in `ns` and delete it.
fn remove_namespace(ns: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = pids_in(ns);
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        let _ = Command::new("kill").arg("-9").args(&pids).stderr(Stdio::null()).status();
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).status();
}

impl Fabric {
    /// Make the switch and one namespace per `(role, address/prefix)`; e.g.
    /// `[("orch", "10.231.0.2/24"), ("h1", "10.231.0.11/24")]`. Panics, naming the fix, when
    /// namespaces cannot be made (not root, no iproute2).
    pub fn create(nodes: &[(&str, &str)]) -> Fabric {
        // Leftovers of runs that died: their process is gone.
        for ns in namespaces() {
            if let Some(rest) = ns.strip_prefix(PREFIX) {
                let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    remove_namespace(&ns);
                }
            }
        }
        let tag = format!("{PREFIX}{}", std::process::id());
        let probe = Command::new("ip").args(["netns", "add", &format!("{tag}-sw")]).output();
        match probe {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "cannot make a network namespace ({}): the multi-host tests need root and iproute2; scripts/test.sh runs them as root",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => panic!("cannot run `ip` ({e}): install iproute2 (scripts/test.sh does)"),
        }
        let f = Fabric {
            tag: tag.clone(),
            nodes: nodes.iter().map(|(r, a)| (r.to_string(), a.to_string())).collect(),
            owned: true,
        };
        let sw = f.switch();
        ip(&["-n", &sw, "link", "set", "lo", "up"]);
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        for (role, addr) in nodes {
            let ns = f.ns(role);
            ip(&["netns", "add", &ns]);
            let port = format!("p-{role}");
            ip(&["-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
            ip(&["-n", &sw, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &sw, "link", "set", &port, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &ns, "addr", "add", addr, "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            let routes = Command::new("ip").args(["-n", &ns, "route", "show", "default"]).output().unwrap();
            assert!(routes.stdout.is_empty(), "namespace {ns} has a default route");
        }
        f
    }

    /// Use namespaces another process made (with the same `nodes`), leaving them in place on
    /// drop.
    pub fn attach(tag: &str, nodes: &[(&str, &str)]) -> Fabric {
        Fabric {
            tag: tag.to_string(),
            nodes: nodes.iter().map(|(r, a)| (r.to_string(), a.to_string())).collect(),
            owned: false,
        }
    }

    /// The switch namespace.
    pub fn switch(&self) -> String {
        format!("{}-sw", self.tag)
    }

    /// The namespace of a node.
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.tag)
    }

    /// A node's address without the prefix length.
    pub fn addr(&self, role: &str) -> String {
        let a = &self.nodes.iter().find(|(r, _)| r == role).unwrap_or_else(|| panic!("no node {role}")).1;
        a.split('/').next().unwrap_or_default().to_string()
    }

    /// Cut (`false`) or restore (`true`) a node's cable: its bridge port goes down or up.
    pub fn link(&self, role: &str, up: bool) {
        ip(&["-n", &self.switch(), "link", "set", &format!("p-{role}"), if up { "up" } else { "down" }]);
    }

    /// A command that runs `program` inside a node.
    pub fn exec(&self, role: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(role), program]);
        c
    }

    /// Remove everything now (also done on drop).
    pub fn teardown(&self) {
        for (role, _) in &self.nodes {
            remove_namespace(&self.ns(role));
        }
        remove_namespace(&self.switch());
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        if self.owned {
            self.teardown();
        }
    }
}
