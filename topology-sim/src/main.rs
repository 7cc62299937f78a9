//! Grows a relay tree by power-of-two-choices joins on a virtual clock and reports its shape.
//!
//! Invariants, checked after every join and once more over the whole tree at the end (a
//! join changes only the joining node and its parent, so checking those two after a join
//! keeps the whole tree checked):
//! - `single-parent`: every node but the core (node 0) has exactly one parent, attached
//!   before it, and appears in exactly one child list, its parent's; the core has none;
//! - `acyclic`: the walk up from any node reaches the core within N steps;
//! - `fan-out`: no node has more than K children;
//! - `depth`: the core is at depth 0, any other node one below its parent.
//!
//! A run is a function of (nodes, fan-out, seed, join interval): the seeded ChaCha8
//! generator is its only randomness, and the seed is printed so the run can be replayed.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;

use anyhow::{bail, ensure, Context, Result};
use canopy::config::StreamConfig;
use clap::Parser;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

const CORE: u32 = 0;
const SAMPLE_TRIES: u32 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "topology-sim",
    about = "Grow a Canopy relay tree by power-of-two-choices joins and report its shape"
)]
struct Args {
    /// Nodes in the tree, the core included.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    nodes: u32,
    /// Most children one node serves.
    #[arg(long, default_value_t = default_fanout(), value_parser = clap::value_parser!(u32).range(1..))]
    fanout: u32,
    /// Seed of the run (default: random; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// Virtual time between two joins, in milliseconds.
    #[arg(long, default_value_t = 10)]
    join_interval_ms: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn default_fanout() -> u32 {
    u32::try_from(StreamConfig::default().fanout).unwrap_or(u32::MAX)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Invariant {
    SingleParent,
    Acyclic,
    FanOut,
    Depth,
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::SingleParent => "single-parent",
            Self::Acyclic => "acyclic",
            Self::FanOut => "fan-out",
            Self::Depth => "depth",
        })
    }
}

fn violated(invariant: Invariant, node: u32, detail: impl fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("invariant {invariant} violated at node {node}: {detail}")
}

/// The attached nodes; ids are dense and in join order, so the core is id 0.
#[derive(Debug)]
struct Tree {
    fanout: u32,
    parent: Vec<Option<u32>>,
    children: Vec<Vec<u32>>,
    depth: Vec<u32>,
    levels: Vec<Vec<u32>>,
    scan: (usize, usize),
}

impl Tree {
    fn new(fanout: u32) -> Self {
        Self {
            fanout,
            parent: vec![None],
            children: vec![Vec::new()],
            depth: vec![0],
            levels: vec![vec![CORE]],
            scan: (0, 0),
        }
    }

    fn len(&self) -> u32 {
        self.parent.len() as u32
    }

    fn has_free_slot(&self, node: u32) -> bool {
        (self.children[node as usize].len() as u64) < u64::from(self.fanout)
    }

    /// The preferred parent of two: shallower, then fewer children, then lower id.
    fn better(&self, a: u32, b: u32) -> u32 {
        let key = |n: u32| (self.depth[n as usize], self.children[n as usize].len(), n);
        if key(b) < key(a) {
            b
        } else {
            a
        }
    }

    /// The shallowest node with a free slot, in breadth-first (level, join) order. The scan
    /// resumes where the last one stopped: nodes never leave, so a full node stays full, and
    /// a new node lands deeper than every node before the scan position.
    fn first_free(&mut self) -> Option<u32> {
        loop {
            let (level, index) = self.scan;
            match self.levels.get(level)?.get(index) {
                Some(&n) if self.has_free_slot(n) => return Some(n),
                Some(_) => self.scan.1 += 1,
                None => self.scan = (level + 1, 0),
            }
        }
    }

    fn attach(&mut self, parent: u32) -> u32 {
        let id = self.len();
        let depth = self.depth[parent as usize] + 1;
        self.parent.push(Some(parent));
        self.children.push(Vec::new());
        self.depth.push(depth);
        self.children[parent as usize].push(id);
        if self.levels.len() <= depth as usize {
            self.levels.push(Vec::new());
        }
        self.levels[depth as usize].push(id);
        id
    }

    /// Checks every invariant a join of `node` can break: those of `node` and of its parent.
    fn check_join(&self, node: u32) -> Result<()> {
        let Some(p) = self.parent[node as usize] else {
            return Err(violated(Invariant::SingleParent, node, "no parent"));
        };
        if p >= node {
            return Err(violated(
                Invariant::SingleParent,
                node,
                format_args!("parent {p} did not attach before it"),
            ));
        }
        let listed = self.children[p as usize]
            .iter()
            .filter(|&&c| c == node)
            .count();
        if listed != 1 {
            return Err(violated(
                Invariant::SingleParent,
                node,
                format_args!("listed {listed} times among the children of its parent {p}"),
            ));
        }
        if self.walk_to_core(node) != Walk::Core {
            return Err(violated(
                Invariant::Acyclic,
                node,
                "walk up does not reach the core",
            ));
        }
        let fan = self.children[p as usize].len();
        if fan as u64 > u64::from(self.fanout) {
            return Err(violated(
                Invariant::FanOut,
                p,
                format_args!("{fan} children, fan-out {}", self.fanout),
            ));
        }
        if self.depth[node as usize] != self.depth[p as usize] + 1 {
            return Err(violated(
                Invariant::Depth,
                node,
                format_args!(
                    "depth {}, parent {p} at depth {}",
                    self.depth[node as usize], self.depth[p as usize]
                ),
            ));
        }
        Ok(())
    }

    fn walk_to_core(&self, node: u32) -> Walk {
        let mut at = node;
        for _ in 0..=self.len() {
            if at == CORE {
                return Walk::Core;
            }
            match self.parent[at as usize] {
                Some(p) => at = p,
                None => return Walk::Detached,
            }
        }
        Walk::Cycle
    }

    /// Counts, over the whole tree, the nodes breaking each invariant.
    fn census(&self) -> Census {
        let mut listed = vec![0u32; self.parent.len()];
        for kids in &self.children {
            for &c in kids {
                listed[c as usize] += 1;
            }
        }
        let mut census = Census::default();
        for n in 0..self.len() {
            let i = n as usize;
            let parented = match self.parent[i] {
                None => n == CORE,
                Some(p) => n != CORE && p < n && self.children[p as usize].contains(&n),
            };
            let expected = u32::from(n != CORE);
            if !parented || listed[i] != expected {
                census.multi_parent += 1;
            }
            match self.walk_to_core(n) {
                Walk::Core => {}
                Walk::Detached => census.unattached += 1,
                Walk::Cycle => census.cycles += 1,
            }
            if self.children[i].len() as u64 > u64::from(self.fanout) {
                census.over_fanout += 1;
            }
            let depth_ok = match self.parent[i] {
                None => self.depth[i] == 0,
                Some(p) => self.depth[i] == self.depth[p as usize] + 1,
            };
            if !depth_ok {
                census.bad_depth += 1;
            }
        }
        census
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Walk {
    Core,
    Detached,
    Cycle,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Census {
    multi_parent: u64,
    cycles: u64,
    unattached: u64,
    over_fanout: u64,
    bad_depth: u64,
}

impl Census {
    fn ensure_clean(&self) -> Result<()> {
        for (invariant, count) in [
            (Invariant::SingleParent, self.multi_parent),
            (Invariant::Acyclic, self.cycles),
            (Invariant::SingleParent, self.unattached),
            (Invariant::FanOut, self.over_fanout),
            (Invariant::Depth, self.bad_depth),
        ] {
            ensure!(
                count == 0,
                "invariant {invariant} violated by {count} nodes in the final tree"
            );
        }
        Ok(())
    }
}

/// One run: the tree, its generator and its virtual clock.
struct Sim {
    tree: Tree,
    rng: ChaCha8Rng,
    now_ms: u64,
    interval_ms: u64,
    fallbacks: u64,
}

impl Sim {
    fn new(fanout: u32, seed: u64, interval_ms: u64) -> Self {
        Self {
            tree: Tree::new(fanout),
            rng: ChaCha8Rng::seed_from_u64(seed),
            now_ms: 0,
            interval_ms,
            fallbacks: 0,
        }
    }

    fn join(&mut self) -> Result<u32> {
        self.now_ms += self.interval_ms;
        let a = self.sample()?;
        let b = self.sample()?;
        let parent = self.tree.better(a, b);
        let id = self.tree.attach(parent);
        self.tree
            .check_join(id)
            .with_context(|| format!("after the join of node {id} at t={} ms", self.now_ms))?;
        Ok(id)
    }

    /// One attached node with a free slot: by rejection sampling, else by breadth-first scan.
    fn sample(&mut self) -> Result<u32> {
        let n = self.tree.len();
        for _ in 0..SAMPLE_TRIES {
            let c = self.rng.random_range(0..n);
            if self.tree.has_free_slot(c) {
                return Ok(c);
            }
        }
        self.fallbacks += 1;
        self.tree
            .first_free()
            .context("no attached node has a free slot")
    }
}

#[derive(Debug)]
struct Report {
    seed: u64,
    nodes: u32,
    fanout: u32,
    join_interval_ms: u64,
    virtual_time_ms: u64,
    max_depth: u32,
    mean_depth: f64,
    depth_histogram: BTreeMap<u32, u64>,
    max_children: usize,
    internal_nodes: u64,
    mean_fanout_internal: f64,
    cycles: u64,
    unattached: u64,
    bfs_fallbacks: u64,
}

fn simulate(nodes: u32, fanout: u32, seed: u64, join_interval_ms: u64) -> Result<Report> {
    ensure!(nodes >= 1, "--nodes must be at least 1 (the core)");
    ensure!(fanout >= 1, "--fanout must be at least 1");
    let mut sim = Sim::new(fanout, seed, join_interval_ms);
    while sim.tree.len() < nodes {
        sim.join()?;
    }
    let census = sim.tree.census();
    census.ensure_clean()?;
    let tree = &sim.tree;

    let mut depth_histogram = BTreeMap::new();
    for &d in &tree.depth {
        *depth_histogram.entry(d).or_insert(0u64) += 1;
    }
    let depth_sum: u64 = tree.depth.iter().map(|&d| u64::from(d)).sum();
    let internal_nodes = tree.children.iter().filter(|c| !c.is_empty()).count() as u64;
    let edges = u64::from(nodes) - 1;
    if edges != tree.children.iter().map(|c| c.len() as u64).sum::<u64>() {
        bail!("invariant single-parent violated: child lists do not hold N-1 edges");
    }
    Ok(Report {
        seed,
        nodes,
        fanout,
        join_interval_ms,
        virtual_time_ms: sim.now_ms,
        max_depth: tree.depth.iter().copied().max().unwrap_or(0),
        mean_depth: depth_sum as f64 / f64::from(nodes),
        depth_histogram,
        max_children: tree.children.iter().map(Vec::len).max().unwrap_or(0),
        internal_nodes,
        mean_fanout_internal: if internal_nodes == 0 {
            0.0
        } else {
            edges as f64 / internal_nodes as f64
        },
        cycles: census.cycles,
        unattached: census.unattached,
        bfs_fallbacks: sim.fallbacks,
    })
}

impl Report {
    fn replay(&self) -> String {
        format!(
            "topology-sim --nodes {} --fanout {} --seed {} --join-interval-ms {}",
            self.nodes, self.fanout, self.seed, self.join_interval_ms
        )
    }

    fn to_json(&self) -> Value {
        let histogram: Vec<Value> = self
            .depth_histogram
            .iter()
            .map(|(depth, nodes)| json!({ "depth": depth, "nodes": nodes }))
            .collect();
        json!({
            "seed": self.seed,
            "nodes": self.nodes,
            "fanout": self.fanout,
            "join_interval_ms": self.join_interval_ms,
            "virtual_time_ms": self.virtual_time_ms,
            "max_depth": self.max_depth,
            "mean_depth": self.mean_depth,
            "depth_histogram": histogram,
            "max_children": self.max_children,
            "internal_nodes": self.internal_nodes,
            "mean_fanout_internal": self.mean_fanout_internal,
            "cycles": self.cycles,
            "unattached": self.unattached,
            "bfs_fallbacks": self.bfs_fallbacks,
            "replay": self.replay(),
        })
    }

    fn to_table(&self) -> String {
        let mut out = format!(
            "topology-sim: {} nodes, fan-out {}, seed {}\nreplay: {}\n\n",
            self.nodes,
            self.fanout,
            self.seed,
            self.replay()
        );
        let rows: [(&str, String); 10] = [
            ("nodes", self.nodes.to_string()),
            ("max_depth", self.max_depth.to_string()),
            ("mean_depth", format!("{:.3}", self.mean_depth)),
            ("max_children", self.max_children.to_string()),
            ("internal_nodes", self.internal_nodes.to_string()),
            (
                "mean_fanout_internal",
                format!("{:.3}", self.mean_fanout_internal),
            ),
            ("cycles", self.cycles.to_string()),
            ("unattached", self.unattached.to_string()),
            ("bfs_fallbacks", self.bfs_fallbacks.to_string()),
            ("virtual_time_ms", self.virtual_time_ms.to_string()),
        ];
        for (name, value) in rows {
            out.push_str(&format!("{name:<22}{value:>12}\n"));
        }
        out.push_str(&format!("\n{:<7}{:>10}{:>9}\n", "depth", "nodes", "share"));
        let widest = self.depth_histogram.values().copied().max().unwrap_or(1);
        for (depth, &count) in &self.depth_histogram {
            let share = 100.0 * count as f64 / f64::from(self.nodes);
            let bar = "#".repeat(((count * 40).div_ceil(widest)) as usize);
            out.push_str(&format!("{depth:<7}{count:>10}{share:>8.2}%  {bar}\n"));
        }
        out
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(rand::random);
    let report = simulate(args.nodes, args.fanout, seed, args.join_interval_ms)
        .with_context(|| format!("seed {seed}"))?;
    let text = if args.json {
        format!("{}\n", serde_json::to_string_pretty(&report.to_json())?)
    } else {
        report.to_table()
    };
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        written => written.context("writing the report"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn grow(nodes: u32, fanout: u32, seed: u64) -> Sim {
        let mut sim = Sim::new(fanout, seed, 10);
        while sim.tree.len() < nodes {
            sim.join().unwrap();
        }
        sim
    }

    fn naive_first_free(tree: &Tree) -> Option<u32> {
        let mut queue = std::collections::VecDeque::from([CORE]);
        let mut best: Option<u32> = None;
        while let Some(n) = queue.pop_front() {
            if tree.has_free_slot(n)
                && best.is_none_or(|b| tree.depth[n as usize] < tree.depth[b as usize])
            {
                best = Some(n);
            }
            queue.extend(tree.children[n as usize].iter().copied());
        }
        best
    }

    #[test]
    fn cli_is_well_formed() {
        Args::command().debug_assert();
    }

    #[test]
    fn a_lone_core() {
        let r = simulate(1, 8, 7, 10).unwrap();
        assert_eq!(r.max_depth, 0);
        assert_eq!(r.mean_depth, 0.0);
        assert_eq!(r.max_children, 0);
        assert_eq!(r.internal_nodes, 0);
        assert_eq!(r.depth_histogram, BTreeMap::from([(0, 1)]));
        assert_eq!(r.virtual_time_ms, 0);
    }

    #[test]
    fn fanout_one_is_a_chain() {
        let r = simulate(50, 1, 3, 10).unwrap();
        assert_eq!(r.max_depth, 49);
        assert_eq!(r.max_children, 1);
        assert_eq!(r.internal_nodes, 49);
        assert_eq!(r.mean_fanout_internal, 1.0);
        assert!(r.depth_histogram.values().all(|&n| n == 1));
        assert_eq!(r.virtual_time_ms, 490);
    }

    #[test]
    fn second_node_attaches_to_the_core() {
        let sim = grow(2, 8, 11);
        assert_eq!(sim.tree.parent, vec![None, Some(CORE)]);
        assert_eq!(sim.tree.depth, vec![0, 1]);
    }

    #[test]
    fn small_trees_hold_every_invariant_exactly() {
        for seed in 0..50 {
            for fanout in 1..=4 {
                for nodes in 1..=40 {
                    let sim = grow(nodes, fanout, seed);
                    let t = &sim.tree;
                    assert_eq!(t.census(), Census::default());
                    assert_eq!(t.parent[0], None);
                    for n in 1..nodes {
                        t.check_join(n).unwrap();
                        let p = t.parent[n as usize].unwrap();
                        assert!(t.children[p as usize].len() as u32 <= fanout);
                    }
                    let edges: usize = t.children.iter().map(Vec::len).sum();
                    assert_eq!(edges as u32, nodes - 1);
                    let levels: usize = t.levels.iter().map(Vec::len).sum();
                    assert_eq!(levels as u32, nodes);
                }
            }
        }
    }

    #[test]
    fn depth_stays_near_the_optimum() {
        for seed in 0..5 {
            let r = simulate(10_000, 8, seed, 10).unwrap();
            assert_eq!(r.cycles, 0);
            assert_eq!(r.unattached, 0);
            assert!(r.max_children <= 8);
            assert_eq!(r.depth_histogram.values().sum::<u64>(), 10_000);
            assert!((5..=8).contains(&r.max_depth), "max depth {}", r.max_depth);
        }
    }

    #[test]
    fn scan_finds_the_shallowest_free_node() {
        let mut sim = grow(1, 2, 5);
        for _ in 0..300 {
            let expected = naive_first_free(&sim.tree).unwrap();
            let got = sim.tree.first_free().unwrap();
            assert!(sim.tree.has_free_slot(got));
            assert_eq!(
                sim.tree.depth[got as usize],
                sim.tree.depth[expected as usize]
            );
            sim.join().unwrap();
        }
    }

    #[test]
    fn ties_go_to_fewer_children_then_lower_id() {
        let mut t = Tree::new(4);
        let a = t.attach(CORE);
        let b = t.attach(CORE);
        let c = t.attach(CORE);
        t.attach(a);
        assert_eq!(t.better(CORE, a), CORE);
        assert_eq!(t.better(a, b), b);
        assert_eq!(t.better(c, b), b);
        assert_eq!(t.better(b, c), b);
    }

    #[test]
    fn same_seed_same_json() {
        let a = simulate(2_000, 4, 42, 10).unwrap().to_json();
        let b = simulate(2_000, 4, 42, 10).unwrap().to_json();
        assert_eq!(a.to_string(), b.to_string());
        assert_eq!(a["seed"], 42);
        assert_eq!(a["nodes"], 2_000);
        for key in [
            "max_depth",
            "mean_depth",
            "max_children",
            "cycles",
            "unattached",
            "depth_histogram",
        ] {
            assert!(!a[key].is_null(), "{key} missing");
        }
        let other = simulate(2_000, 4, 43, 10).unwrap().to_json();
        assert_ne!(a.to_string(), other.to_string());
    }

    #[test]
    fn over_fanout_is_caught_by_name() {
        let mut t = Tree::new(1);
        t.attach(CORE);
        let second = t.attach(CORE);
        let err = t.check_join(second).unwrap_err().to_string();
        assert!(err.contains("fan-out"), "{err}");
        assert_eq!(t.census().over_fanout, 1);
    }

    #[test]
    fn cycles_and_detached_nodes_are_counted() {
        let mut t = Tree::new(4);
        let a = t.attach(CORE);
        let b = t.attach(a);
        t.parent[a as usize] = Some(b);
        let err = t.check_join(b).unwrap_err().to_string();
        assert!(err.contains("acyclic"), "{err}");
        assert_eq!(t.census().cycles, 2);

        let mut t = Tree::new(4);
        let a = t.attach(CORE);
        t.parent[a as usize] = None;
        assert_eq!(t.census().unattached, 1);
        assert!(t.census().ensure_clean().is_err());
    }
}
