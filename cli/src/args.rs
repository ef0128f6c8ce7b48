//! Command-line arguments, parsed into plain data and nothing else.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Content-addressed dataset distribution: publish a directory as an immutable, signed
/// version; pull any version back, verified chunk by chunk.
#[derive(Debug, Parser)]
#[command(name = "shoal", version, about, propagate_version = true)]
pub struct Args {
    /// Print one JSON document on stdout instead of text (errors too, as {"error": ...}).
    #[arg(long, global = true)]
    pub json: bool,

    /// Origin store: a path, file://, s3://bucket/prefix, gs://, az:// or http(s):// (read-only).
    /// Repeat for several (reads go to the nearest holding a version; publishes and tags to
    /// the first). Default: $SHOAL_ORIGIN (comma-separated), then `origin` or `[[origin]]` in
    /// the config file, then $SHOAL_HOME/origin.
    #[arg(long, global = true, value_name = "URL")]
    pub origin: Vec<String>,

    /// Log more (repeat for more detail); SHOAL_LOG=<filter> gives full control.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publish a directory as a new version: `shoal publish ./data imagenet@v3`.
    Publish {
        /// Directory to publish, or an object store URL (s3://bucket/prefix, gs://, az://):
        /// every object under it, its keys' `/` as directories.
        source: String,
        /// NAME@VERSION to create; fails if it already exists.
        target: String,
        /// Point this tag at the new version (repeatable), e.g. --tag latest.
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// Chunk sizes MIN,AVG,MAX in bytes for a dataset's first version (later versions
        /// reuse what the dataset recorded).
        #[arg(long, value_name = "MIN,AVG,MAX")]
        chunking: Option<String>,
        /// Leave the files where they are: record them as ranges of their source objects (only
        /// the tree, indexes and the signed version are written to the origin). Reads of a
        /// file whose source changed later fail, naming it; `shoal verify` lists them.
        #[arg(long)]
        in_place: bool,
        /// Read every file. By default a file the last publish of this directory from this
        /// machine saw with the same size, mtime, ctime and inode (and whose chunks the origin
        /// still holds) is taken as it was, unread.
        #[arg(long)]
        rehash: bool,
        /// How packs store blobs: `zstd` compresses runs of blobs where that saves space
        /// (incompressible data is detected and stored raw), `none` stores every blob raw.
        #[arg(long, value_name = "zstd|none", default_value = "zstd", value_parser = ["zstd", "none"])]
        compression: String,
        /// For a dataset's first version, how files under 1 MiB are cut: `on` in chunks of
        /// 1 / 4 / 16 KiB, so small edited files share all but the few KiB around each edit
        /// with their next version; `whole` one chunk each (media, compressed files: replaced
        /// whole, read and verified whole); `off` like larger files. `auto` picks `on` when a
        /// sample of the small files compresses well (text, code), else `whole`. Later versions
        /// keep what the dataset recorded.
        #[arg(long, value_name = "auto|on|whole|off", default_value = "auto", value_parser = ["auto", "on", "whole", "off"])]
        small_files: String,
    },
    /// Fetch a version (NAME@VERSION, NAME@TAG or NAME@b3:<root>) and write its files.
    Pull {
        /// The version to pull.
        reference: String,
        /// Where to write the files (default: ./<dataset name>).
        #[arg(long, value_name = "DIR")]
        to: Option<PathBuf>,
        /// Only fetch into the local store; write no files.
        #[arg(long, conflicts_with = "to")]
        no_files: bool,
        /// Only files matching this glob, from the version's root ('*.jpg', 'train/', 'shards/s[0-3]';
        /// `*` crosses '/'; a directory takes what is under it). Repeatable.
        #[arg(long, value_name = "GLOB")]
        include: Vec<String>,
        /// Leave out files matching this glob (or under a directory it matches). Repeatable.
        #[arg(long, value_name = "GLOB")]
        exclude: Vec<String>,
    },
    /// Print this machine's publisher public key.
    Key,
    /// Trust versions and tags signed by this public key.
    Trust {
        /// ed25519:<64 hex digits>, as printed by `shoal key`.
        key: String,
        /// Only for datasets whose names match these patterns (repeatable or comma-separated;
        /// `*` matches anything, e.g. 'org/*'). Replaces what the key was trusted for before.
        #[arg(long, value_name = "PATTERN")]
        datasets: Vec<String>,
    },
    /// List the versions (and tags) of a dataset.
    Versions {
        /// Dataset name.
        name: String,
    },
    /// List a directory (or show a file) inside a version.
    Ls {
        /// The version.
        reference: String,
        /// Path inside the version (default: its root).
        path: Option<String>,
    },
    /// Show files added, removed and changed between two versions.
    Diff {
        /// The old version.
        from: String,
        /// The new version.
        to: String,
    },
    /// Mount a version read-only; stays in the foreground until unmounted or interrupted.
    Mount {
        /// The version to mount.
        reference: String,
        /// An existing empty directory.
        mountpoint: PathBuf,
        /// What to fetch ahead of readers: none, sequential (ahead of sequential readers) or
        /// all (the whole version in the background).
        #[arg(long, value_enum, default_value = "sequential")]
        prefetch: PrefetchArg,
        /// A file of paths, one per line (e.g. a data loader's order for the next epoch):
        /// fetched in that order ahead of the reader.
        #[arg(long, value_name = "FILE")]
        read_order: Option<PathBuf>,
        /// How far (in bytes, e.g. 512MiB) `--read-order` fetching may run ahead of the reader.
        #[arg(long, default_value = "512MiB", value_name = "SIZE")]
        read_ahead: String,
        /// Seconds a read waits for a missing chunk before failing with EIO.
        #[arg(long, default_value_t = shoal_node::MountSpec::DEFAULT_TIMEOUT_SECS, value_name = "SECS")]
        timeout: u64,
        /// FUSE worker threads.
        #[arg(long, default_value_t = shoal_node::MountSpec::DEFAULT_THREADS)]
        threads: usize,
        /// Bypass the kernel page cache (for measurements).
        #[arg(long, hide = true)]
        direct_io: bool,
        /// Let the kernel read large files straight from whole-file copies kept beside the
        /// store (FUSE passthrough; needs root): auto (when the version's files average over
        /// 4 MiB: the mount then takes part in opens, which costs small files ~15%), on, off.
        #[arg(long, value_enum, default_value = "auto")]
        passthrough: PassthroughArg,
    },
    /// Unmount a mounted version.
    Unmount {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// Serve the Kubernetes CSI node plugin (`csi.shoal.dev`) on a Unix socket: pods' inline
    /// volumes with `volumeAttributes: {ref: NAME@VERSION}` are mounted by the local node
    /// daemon at the pod's path. Runs until SIGINT or SIGTERM, then unmounts its volumes.
    Csi {
        /// The socket kubelet calls, `unix:///csi/csi.sock` or a path.
        #[arg(long, env = "CSI_ENDPOINT", value_name = "ENDPOINT")]
        endpoint: String,
        /// This node's name as Kubernetes knows it (`spec.nodeName`; default: the host name).
        #[arg(long, env = "NODE_ID", value_name = "NAME")]
        node_id: Option<String>,
    },
    /// Fetch a version into the local store and keep it from eviction.
    Pin {
        /// The version to pin.
        reference: String,
        /// Only files matching this glob, from the version's root ('*.jpg', 'train/', 'shards/s[0-3]';
        /// `*` crosses '/'; a directory takes what is under it). Repeatable.
        #[arg(long, value_name = "GLOB")]
        include: Vec<String>,
        /// Leave out files matching this glob (or under a directory it matches). Repeatable.
        #[arg(long, value_name = "GLOB")]
        exclude: Vec<String>,
    },
    /// Let a pinned version be evicted again.
    Unpin {
        /// The pinned version.
        reference: String,
    },
    /// Show the local store: usage, capacity, pins, hit rate.
    Cache,
    /// Free everything in the local store that no pinned version needs.
    Gc,
    /// Run this machine's node daemon: `shoal node run --bootstrap /ip4/10.0.0.5/tcp/4001`.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Show the running node: peer id, listen addresses, peers, versions held, traffic.
    Status,
    /// Point a tag at a version: `shoal tag imagenet@v3 latest`.
    Tag {
        /// NAME@VERSION.
        target: String,
        /// Tag name.
        tag: String,
    },
    /// Remove a version from the origin: `shoal rm imagenet@v2`. A signed record of the removal
    /// stays, so nodes refuse the version (even from their caches) and its name is never
    /// reused; its packs are freed by `shoal origin gc` once no other version needs them.
    Rm {
        /// NAME@VERSION to remove.
        target: String,
        /// Also delete the tags that point at it (named in the output); refused without.
        #[arg(long)]
        force: bool,
        /// Why, kept in the removal record (e.g. "licence withdrawn").
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Maintain the origin itself: `shoal origin gc`.
    Origin {
        #[command(subcommand)]
        command: OriginCommand,
    },
    /// Read every blob of a version where it lives and check it against its id; names every
    /// missing or damaged object, and every in-place file whose source changed (exit 1 if any).
    Verify {
        /// The version; with --all, a dataset name.
        reference: String,
        /// Verify every version of the dataset (each pack once).
        #[arg(long, conflicts_with = "local")]
        all: bool,
        /// Verify this machine's copy instead (the local store): every blob it holds of the
        /// version is read and checked, damaged ones dropped to be fetched again; reports
        /// what is missing and what was damaged, by file.
        #[arg(long)]
        local: bool,
    },
    /// Copy versions to another origin: what it lacks of their packs, indexes and version
    /// objects, and the tags that point at them; verified, resumable, incremental.
    Replicate {
        /// Versions to copy (NAME@VERSION, NAME@TAG, NAME@b3:<root>); with --all, dataset names.
        #[arg(required = true, value_name = "REF")]
        refs: Vec<String>,
        /// The origin to copy into: a path, file://, s3://, gs:// or az://.
        #[arg(long, value_name = "URL")]
        to: String,
        /// Copy every version of the datasets named.
        #[arg(long)]
        all: bool,
        /// Also copy the bytes of in-place versions into packs at the target (by default the
        /// target names the same source objects); readers there then need not reach them.
        #[arg(long)]
        copy_sources: bool,
    },
    /// Print a shell completion script: `shoal completions bash > /etc/bash_completion.d/shoal`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: Shell,
    },
    /// Write man pages (shoal.1 and one per command, e.g. shoal-pull.1) into DIR.
    Man {
        /// Where to write them, e.g. /usr/local/share/man/man1 (created if absent).
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum OriginCommand {
    /// Delete what no version needs: packs and indexes no version names (after a removal, or
    /// left by a failed publish), once older than the grace period, and version objects of
    /// removed versions. Safe while other machines publish and pull; resumable after a kill.
    Gc {
        /// Report what would be deleted (objects, bytes), delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Set the origin's grace period (e.g. 24h, 7d): nothing younger is deleted, and a
        /// publish taking longer writes no version. A shorter grace applies once the longer
        /// one has passed. Default: 24h.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        grace: Option<std::time::Duration>,
        /// Apply a shorter --grace at once: only when no publish that started before is still
        /// running (a maintenance window, a new origin), or what it wrote may be deleted.
        #[arg(long, requires = "grace")]
        apply_now: bool,
    },
    /// Show or set which versions of a dataset `shoal origin gc` keeps: any rule keeps a
    /// version, the others are removed (as by `shoal rm`). Without options, shows the rules.
    Retain {
        /// The dataset.
        dataset: String,
        /// Keep the newest N versions.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        keep_last: Option<u32>,
        /// Keep every version a tag points at.
        #[arg(long)]
        keep_tagged: bool,
        /// Keep versions published less than this long ago (e.g. 30d).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        keep_younger_than: Option<std::time::Duration>,
        /// Remove the rules: keep every version.
        #[arg(long, conflicts_with_all = ["keep_last", "keep_tagged", "keep_younger_than"])]
        clear: bool,
    },
    /// Rewrite a dataset's packs whose live bytes (those a version still reads) are below a
    /// share of their size into new packs of the live blobs alone; `shoal origin gc` deletes
    /// the old packs after the grace period. Every version still reads exactly.
    Repack {
        /// The dataset.
        dataset: String,
        /// Rewrite packs whose live share is below this (0 to 1).
        #[arg(long, default_value_t = 0.5, value_name = "SHARE")]
        threshold: f64,
        /// Report which packs would be rewritten and what gc would then free; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// `shoal completions` shells.
pub use clap_complete::Shell;

// Parsed once per process: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Run the daemon in the foreground until SIGINT/SIGTERM. CLI commands on this machine
    /// (pull, versions, ls) go through it; peers fetch chunks from it. Flags override the
    /// `[node]` section of the config file.
    Run {
        /// Listen address (repeatable), e.g. /ip4/0.0.0.0/tcp/4001 (default: any port).
        #[arg(long, value_name = "MULTIADDR")]
        listen: Vec<String>,
        /// A peer to connect to (repeatable); /p2p/<peer id> is optional.
        #[arg(long, value_name = "MULTIADDR")]
        bootstrap: Vec<String>,
        /// This node's region label (e.g. eu-west-1): peers and origins in the same region
        /// are preferred over others.
        #[arg(long, value_name = "NAME")]
        region: Option<String>,
        /// This node's zone label (e.g. eu-west-1a), preferred over region.
        #[arg(long, value_name = "NAME")]
        zone: Option<String>,
        /// This node's rack label, preferred over zone: peers on the same rack first.
        #[arg(long, value_name = "NAME")]
        rack: Option<String>,
        /// A file of allowed peer ids, one per line. With --cluster-key too, either admits.
        #[arg(long, value_name = "FILE")]
        members: Option<PathBuf>,
        /// The cluster's secret key file (from `shoal node keygen`, handed to every node, e.g.
        /// as a Kubernetes Secret): peers that prove they hold it are admitted; others get
        /// nothing. Without this, --members or --open, only peers on this machine are.
        #[arg(long, value_name = "FILE", env = "SHOAL_CLUSTER_KEY_FILE")]
        cluster_key: Option<PathBuf>,
        /// Serve anyone who connects: the choice for public data only.
        #[arg(long, conflicts_with_all = ["members", "cluster_key"])]
        open: bool,
        /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9464.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// Do not discover peers on the LAN with mDNS.
        #[arg(long)]
        no_mdns: bool,
        /// Send chunks to peers as they are, never compressed (default: each group of an
        /// answer compressed with zstd when a probe says it pays). Overrides `[node]
        /// wire_compression`.
        #[arg(long)]
        no_wire_compression: bool,
        /// Most bytes per second read from the origins, all together (e.g. 100MB; 0:
        /// unlimited). Overrides `[rates] origin`.
        #[arg(long, value_name = "RATE")]
        origin_rate: Option<String>,
        /// Most bytes per second sent to peers, all together. Overrides `[rates] upload`.
        #[arg(long, value_name = "RATE")]
        upload_rate: Option<String>,
        /// Most bytes per second received from peers, all together. Overrides `[rates]
        /// download`.
        #[arg(long, value_name = "RATE")]
        download_rate: Option<String>,
    },
    /// Write a new cluster key to FILE (mode 0600): give the same file to every node of the
    /// cluster (`shoal node run --cluster-key FILE`).
    Keygen {
        /// Where to write it; an existing file is never overwritten.
        file: PathBuf,
    },
}

/// `--prefetch` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PrefetchArg {
    None,
    Sequential,
    All,
}

/// `shoal mount --passthrough`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PassthroughArg {
    Auto,
    On,
    Off,
}

#[cfg(test)]
mod tests {
    use super::Args;
    use clap::CommandFactory;

    /// Every command and every flag a user can type says what it does (`--help`, man pages,
    /// completions with descriptions).
    #[test]
    fn every_command_and_flag_has_help_text() {
        fn check(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            if cmd.get_about().is_none() {
                missing.push(format!("command `{path}`"));
            }
            for a in cmd.get_arguments() {
                if a.get_help().is_none() && !a.is_hide_set() {
                    missing.push(format!("`{path}` argument {}", a.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                check(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut cmd = Args::command();
        cmd.build();
        let mut missing = Vec::new();
        check(&cmd, "shoal", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
        cmd.debug_assert();
    }
}
