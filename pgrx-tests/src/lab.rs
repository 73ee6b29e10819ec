//! A network lab: network namespaces joined by Linux bridges, so that each node has its own
//! address and real multicast, and links can be cut. Everything lives in namespaces this
//! process creates (named after its pid) and is removed on drop; no other address is touched.
//!
//! Layout: one "hub" namespace holds the bridges (`br0`, `br1`, ...). A node is a namespace
//! with one interface per bridge it joins (`eth<b>`, address `10.213.<b>.<node + 10>/24`),
//! the other end of each veth pair enslaved to the bridge in the hub.

use std::net::Ipv4Addr;
use std::process::Command;

pub struct Lab {
    prefix: String,
    hub: String,
    bridges: usize,
    nodes: Vec<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Lab {
    /// A lab with `bridges` bridges, or why namespaces cannot be made here (not root, no
    /// `ip`, a container without CAP_SYS_ADMIN): the caller prints it and skips.
    pub fn new(bridges: usize) -> Result<Lab, String> {
        let prefix = format!("ps{}", std::process::id());
        let hub = format!("{prefix}-hub");
        ip(&["netns", "add", &hub])?;
        let lab = Lab { prefix, hub, bridges, nodes: Vec::new() };
        for b in 0..bridges {
            let br = format!("br{b}");
            // No IGMP snooping: without a querier on the bridge it could drop announcements.
            lab.hub_ip(&["link", "add", &br, "type", "bridge", "mcast_snooping", "0"])?;
            lab.hub_ip(&["link", "set", &br, "up"])?;
        }
        Ok(lab)
    }

    fn hub_ip(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["-n", self.hub.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A new node namespace joined to `bridges`; returns its name and its address on each.
    pub fn node(&mut self, bridges: &[usize]) -> (String, Vec<Ipv4Addr>) {
        let i = self.nodes.len();
        let ns = format!("{}-n{i}", self.prefix);
        ip(&["netns", "add", &ns]).unwrap();
        self.nodes.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]).unwrap();
        let mut addrs = Vec::new();
        for &b in bridges {
            assert!(b < self.bridges, "no bridge {b}");
            let (outer, inner) = (format!("v{i}b{b}"), format!("eth{b}"));
            self.hub_ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &ns]).unwrap();
            self.hub_ip(&["link", "set", &outer, "master", &format!("br{b}"), "up"]).unwrap();
            let addr = Ipv4Addr::new(10, 213, b as u8, i as u8 + 10);
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", &inner]).unwrap();
            ip(&["-n", &ns, "link", "set", &inner, "up"]).unwrap();
            addrs.push(addr);
        }
        (ns, addrs)
    }

    /// Cut (`up = false`) or restore node `i`'s link to bridge `b`.
    pub fn link(&self, i: usize, b: usize, up: bool) {
        self.hub_ip(&["link", "set", &format!("v{i}b{b}"), if up { "up" } else { "down" }]).unwrap();
    }

    /// Capture bridge `b`'s traffic into `file` until the returned child is killed.
    pub fn capture(&self, b: usize, file: &std::path::Path) -> std::process::Child {
        Command::new("ip")
            .args(["netns", "exec", &self.hub, "tcpdump", "-i", &format!("br{b}"), "-U", "-s", "0", "-w"])
            .arg(file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tcpdump (installed by make setup)")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace deletes its interfaces, and with them their veth peers.
        for ns in self.nodes.iter().chain(std::iter::once(&self.hub)) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
