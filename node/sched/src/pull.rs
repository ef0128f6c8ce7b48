//! The scheduler of one pull: which of a version's missing chunks to ask of which peer, and
//! which to read from the origin.
//!
//! Every chunk goes to the best source that has it: peers first, ranked by locality (rack,
//! zone, region), then by how soon they can deliver (bytes already queued to them over their
//! measured throughput, plus RTT), each with a cap on bytes in flight. A chunk no peer has is
//! read from the origin by one of the nodes pulling the version: chunks are grouped in runs of
//! pack order and each run is assigned by rendezvous hashing over the live pullers, so a cold
//! cluster reads each chunk from the origin about once and swaps the rest. A request that is
//! late is re-issued to another source (the first good copy wins); a peer that stalls is
//! given no more of that chunk; a "not here" for a chunk a peer advertised is reported so the
//! driver can count it against the peer; a puller with faults, or whose have-map stopped
//! growing, owns no runs (the others take them over).

use crate::{mix, HaveMap, PeerKey};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The scheduler's knobs. The defaults are what the simulator runs, and the node too but for
/// `peer_window_min` (it keeps a fixed `peer_window`: see the node's `fetch.rs`) and
/// `have_deltas` (on in the node and the simulator's fleet, off in its mesh); each was
/// measured (see `docs/swarm.md`).
#[derive(Debug, Clone)]
pub struct Config {
    /// Bytes in flight to one peer: what it delivers in `window_time` at the rate measured
    /// from it, within `peer_window_min..=peer_window` (the least until it is measured).
    /// Enough to keep its link busy, and no more: a deep queue at one holder commits chunks
    /// to it that a neighbour who gets them a moment later, with an idle uplink, could have
    /// sent (simulated, 64 nodes with 8 peers each behind a 10 Gbit origin: p99 1.16 s
    /// against 1.63 s with 32 MiB to every peer).
    pub peer_window: u64,
    pub peer_window_min: u64,
    pub window_time: Duration,
    /// One request to a peer: at most this many bytes and `peer_ids` chunks.
    pub peer_batch: u64,
    pub peer_ids: usize,
    /// Chunks per run assigned to one origin reader (about 1.3 MiB at the default chunk size).
    pub run: usize,
    /// One origin read batch (about one run, so a reader's first chunks land early and its
    /// peers see it make progress), and how many run at once: `origin_parallel` shared among
    /// the pullers that still have runs to read, so the last reader, when the others are
    /// through their shares, gets them all; but at least `origin_per_reader` each, of at
    /// least half a batch, when there are many readers. (8 nodes with 8 each put 64 flows on
    /// a 200 Mbit origin link: 1.5% of its bytes were TCP/IP headers of small segments,
    /// against 0.1% for one flow. 8 nodes with 1 each left the link idle between one node's
    /// answer and its next request: 45.5 s against 45.3-45.4 s with 2 each; 3 each, 45.6 s.)
    /// An origin shares its link among the reads in flight, so a batch lands only when all
    /// of them have moved that much: 32 readers with one 1 MiB read each waited 45 ms for
    /// their first chunks, and then a round trip between one read and the next; with two of
    /// 512 KiB each, simulated at 64 nodes, p99 0.991 s (`sim --nodes 64 --zones 3
    /// --origin-readers 32`) against 1.002 s with two of 1 MiB (a throwaway variant, not
    /// kept), 8 nodes unchanged (two of 1 MiB each, as before; `docs/benchmarks.md`).
    pub origin_batch: u64,
    pub origin_parallel: usize,
    pub origin_per_reader: usize,
    /// A puller whose have-map has not grown for this long is not waited for. Behind a slow
    /// origin link a reader's first run can take seconds.
    pub puller_idle: Duration,
    /// How often have-maps are asked for while pulling; more often once this node has no
    /// origin reads of its own left, when what it lacks is what the others are still reading
    /// (at the end of a cold pull, half a poll is most of the time between the origin's last
    /// byte and the last node done).
    pub have_poll: Duration,
    pub have_poll_waiting: Duration,
    /// Attempts at the origin before a chunk fails the pull.
    pub origin_tries: u32,
    /// With peers connected, how long to let their announcements and have-maps arrive before
    /// reading anything from the origin (nodes starting together, or one rejoining a running
    /// pull): only until every peer that announced the version has sent its have-map.
    pub settle: Duration,
    /// A request past its deadline is re-issued elsewhere once its peer has also sent
    /// nothing for this long.
    pub quiet: Duration,
    /// Slack on every peer request's deadline, on top of its queue at the peer's rate.
    pub deadline_slack: Duration,
    /// How many of the version's pullers read from the origin: the first given (with
    /// [`Self::readers_in_order`], as the node does) or else the ones ranked first by
    /// rendezvous on the version's key; the runs are shared among them. A bounded set keeps
    /// the origin serving a few long sequential streams whatever the size of the fleet, so
    /// each run is out of the origin in milliseconds and spreads through the swarm behind it
    /// (1,000 readers of one run each would all finish at the end of the origin's time).
    /// [`ORIGIN_READERS`] by default.
    pub origin_readers: usize,
    /// The pullers given to [`Pull::set_pullers`] come in order of precedence (the first to
    /// start first), and the readers are the first of them rather than the first by rank:
    /// a puller that starts later never takes over runs the earlier readers may already
    /// have read. (The node's rosters give them so, `shoal_swarm::roster`; the simulator
    /// does with `--readers-by-start`.)
    pub readers_in_order: bool,
    /// The fastest the origin is taken to deliver a version to its readers together, in bytes
    /// per second: a reader that started `t` after the one before it (by the start times the
    /// pullers give, [`Puller::started_ms`]) owns no run that lies, in pack order, before
    /// where that one's runs begin plus `t` times this (plus a quarter of the version at
    /// most, [`PACE_LEAD`]). The readers read their runs in pack order, together at most at
    /// the origin's rate, so by the time a reader starts every run before that point may have
    /// been read and every run after it has not: a newcomer takes only runs nobody has read,
    /// and never reads again what an earlier reader it cannot see has read (pulls that start spread
    /// out, as jobs do, would otherwise cost origin egress with every reader that joins: 64
    /// nodes over 2 s, 1.107x without with 8 readers, 1.343x with 32; 1.000x with). Too low,
    /// and a newcomer may read again what a faster origin already gave; too high, and fewer
    /// readers share the start of the version (pulls started 20 ms apart leave the first
    /// 40 MB to the first reader alone). A run whose owner this node saw fail goes to the
    /// others by rendezvous, ignoring this (bounding each reader's head to its share instead,
    /// as once, cost 1.19x over a 2 s spread with 32 readers: a later reader's share began
    /// before what the origin had given by then). Only with
    /// [`Self::readers_in_order`]; 0 turns it off (every reader shares every run).
    pub origin_pace: u64,
    /// Peers push what they gain as have-deltas ([`Pull::on_have`]): their whole map is asked
    /// for once, when they appear, not polled every [`Self::have_poll`].
    pub have_deltas: bool,
    /// A wanted chunk that no source in view holds is read from the origin by this node, its
    /// owner or not, once nothing has landed for this long (or for four times the longest
    /// wait between landings under half the threshold, or the longest origin read, seen so
    /// far, if longer): the owner may be a lying or stalled node this one cannot see, and a
    /// pull must end. (See [`Pull::poll`]: the next reader in line takes such runs first, and
    /// the spells of earlier stalls count toward how far down the line a stall reaches.)
    pub stuck: Duration,
    /// Among the readers chosen as a pull began, once all but an eighth of them (at least
    /// one, and three or more readers shown, those chosen since counted too) have shown a
    /// sign of life (in view with no fault caught, or, out of view, a chunk of a run it owns
    /// held by a peer other than itself while nobody else can have read it in its place), the
    /// rest are dead if they show none within twice what the slowest of those took, and at
    /// least this long. A lying or stalled reader is then passed over in about a second
    /// rather than a quiet spell ([`Self::stuck`]): 256 simulated nodes with 3 liars and 32
    /// readers, one liar among them, p99 1.10 s against 5.10 s (`docs/benchmarks.md`,
    /// nineteenth session). (Four times the median, the first form, judged honest readers
    /// dead at a slow origin that served them unevenly: the simulator's hostile fleet at
    /// 200 Mbit read 1.13x the version.) A reader out of view whose share stays a quarter
    /// unread while nine tenths of the other readers' are here is also passed over after this
    /// long. `Duration::MAX` turns both off.
    pub reader_lag: Duration,
}

/// How many of a version's pullers read from the origin, by default. Data enters the swarm at
/// each reader, so more readers keep a fleet that starts together closer behind the origin
/// (simulated, 10 Gbit links and origin, 3 zones, 1 GiB: p99 1.16x the link floor at 64 nodes
/// with 8, 1.12x with 16, 1.10x with 32; at 1,000 nodes 1.27x with 8, 1.14x with 32). Pulls
/// that start spread out add readers as they start; [`Config::origin_pace`] keeps each
/// newcomer off what earlier readers may have read (64 nodes over 2 s: 1.000x with 32). A
/// lying reader, likelier with more readers, is passed over in about a second
/// ([`Config::reader_lag`]). `docs/benchmarks.md`, eighteenth to twentieth sessions. Each
/// reader reads its share of `origin_parallel` x `origin_batch` (16 MiB), in at least two
/// reads of at least 512 KiB.
pub const ORIGIN_READERS: usize = 32;

/// A reader's runs begin at most this fraction of the version past the previous reader's
/// (by start), whatever the gap between their starts ([`Config::origin_pace`]): a puller
/// listed as started long before the others (a lying roster member's claim) owns a quarter
/// of the version alone, not all of it, so the others own runs of their own, show life on
/// them, and pass it over in about a second if it reads nothing ([`Config::reader_lag`]);
/// readers whose runs would begin past the end own none and are not judged. (Bounding each
/// reader to `i/k` of the version instead, the i-th of k to start, cost 1.19x the version
/// from the origin over a 2 s spread with 32 readers: the shares began before what the origin
/// had given by then. A quarter of the rest rather than of the version, ff4e88e, bound at
/// 300 ms over 32 nodes of 128 MiB: 1.023x. Gaps of a quarter of the version at 2 GB/s,
/// 134 ms for 1 GiB, are rare between consecutive readers.)
pub const PACE_LEAD: u64 = 4;

/// Pullers a node's content routing lists per version beyond the origin readers, so that a
/// reader that fails has a successor everyone knows (`shoal_swarm::roster::ROSTER`).
pub const SPARE_READERS: usize = 8;

impl Default for Config {
    fn default() -> Config {
        Config {
            peer_window: 32 << 20,
            peer_window_min: 1 << 20,
            window_time: Duration::from_millis(10),
            peer_batch: 4 << 20,
            peer_ids: 1024,
            run: 32,
            origin_batch: 1 << 20,
            origin_parallel: 16,
            origin_per_reader: 2,
            puller_idle: Duration::from_secs(20),
            have_poll: Duration::from_millis(250),
            have_poll_waiting: Duration::from_millis(50),
            origin_tries: 3,
            settle: Duration::from_secs(1),
            quiet: Duration::from_secs(1),
            deadline_slack: Duration::from_secs(2),
            origin_readers: ORIGIN_READERS,
            readers_in_order: false,
            origin_pace: 2_000_000_000,
            have_deltas: false,
            stuck: Duration::from_secs(5),
            reader_lag: Duration::from_secs(1),
        }
    }
}

/// A puller of the version as the driver's content routing lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Puller<P> {
    /// Its rendezvous seed.
    pub seed: u64,
    pub id: P,
    /// When it started pulling, in milliseconds on a scale every node shares: the puller's
    /// own word, carried verbatim (since the Unix epoch, by its clock), so every node works
    /// out the same thing from it whatever its own clock. 0 when unknown.
    pub started_ms: u64,
}

/// The chunks of a version, as a pull sees them.
#[derive(Debug, Clone)]
pub struct Chunks {
    /// Each unique chunk's length, in walk order (the index space of have-maps).
    pub lens: Vec<u32>,
    /// Each chunk's rendezvous key (the first 8 bytes of its hash, little-endian).
    pub keys: Vec<u64>,
    /// Every chunk index, in the order the origin stores them (origin reads follow it).
    pub porder: Vec<usize>,
    /// The version's rendezvous key (the first 8 bytes of its root): which pullers read from
    /// the origin.
    pub key: u64,
    /// By position in `porder`: whether the chunk must be read with the one before it (they
    /// share a compressed frame of a pack, which is read whole), so that no run boundary
    /// falls between them and no frame is read from the origin twice. Empty: none is.
    pub tied: Vec<bool>,
}

/// A version's chunks laid out for pulls (runs of `run` chunks in pack order): worked out once
/// and shared by every pull of the version (a fleet simulation runs one per node).
#[derive(Debug)]
pub struct Layout {
    run: usize,
    lens: Vec<u32>,
    /// Chunk indexes in pack order (origin reads follow it), and each chunk's run (its
    /// number: runs are `run` chunks of `porder`, more where chunks are tied).
    porder: Vec<usize>,
    run_of: Vec<usize>,
    /// Where each run begins in `porder`, and its end.
    starts: Vec<usize>,
    /// Rendezvous key of each run (its first chunk's key), and where it begins in the version
    /// (in bytes, in pack order).
    run_key: Vec<u64>,
    run_pos: Vec<u64>,
    /// The version's size, and its rendezvous key.
    size: u64,
    key: u64,
}

impl Layout {
    /// `version` cut into runs of `run` chunks (`Config::run` of the pulls that share it).
    pub fn new(version: Chunks, run: usize) -> Layout {
        let Chunks {
            lens,
            keys,
            porder,
            key,
            tied,
        } = version;
        let n = lens.len();
        assert!(run > 0, "a run holds some chunk");
        assert_eq!(keys.len(), n, "a key per chunk");
        assert_eq!(porder.len(), n, "pack order covers every chunk");
        assert!(
            tied.is_empty() || tied.len() == n,
            "tied: none, or by position"
        );
        let mut run_of = vec![0; n];
        let mut starts = Vec::with_capacity(n.div_ceil(run) + 1);
        let mut run_key = Vec::with_capacity(n.div_ceil(run));
        let mut run_pos = Vec::with_capacity(n.div_ceil(run));
        let mut at = 0u64;
        for (pos, &i) in porder.iter().enumerate() {
            let full = starts.last().is_none_or(|s| pos - s >= run);
            if full && !tied.get(pos).is_some_and(|t| *t && pos > 0) {
                starts.push(pos);
                run_pos.push(at);
                run_key.push(keys[i]);
            }
            at += lens[i] as u64;
            run_of[i] = starts.len() - 1;
        }
        starts.push(n);
        Layout {
            run,
            lens,
            porder,
            run_of,
            starts,
            run_key,
            run_pos,
            size: at,
            key,
        }
    }

    /// How many chunks the version has.
    pub fn chunks(&self) -> usize {
        self.lens.len()
    }

    /// How many runs it is cut into.
    pub fn runs(&self) -> usize {
        self.starts.len() - 1
    }

    /// Positions in pack order of run `k`'s chunks.
    fn run_span(&self, k: usize) -> std::ops::Range<usize> {
        self.starts[k]..self.starts[k + 1]
    }

    /// Each run's chunks, in pack order.
    fn run_chunks(&self) -> impl Iterator<Item = &[usize]> + '_ {
        self.starts.windows(2).map(|w| &self.porder[w[0]..w[1]])
    }

    /// Each chunk's length, in walk order.
    pub fn lens(&self) -> &[u32] {
        &self.lens
    }
}

/// What a source says it holds of the version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// Every chunk.
    Complete,
    /// A pull is filling it: what it has is its have-map.
    Pulling,
    /// A mount reads it on demand: nothing a pull can count on.
    Mounted,
}

/// A peer that announced the version, as the driver knows it.
#[derive(Debug, Clone)]
pub struct Source {
    /// Its rendezvous seed (the same on every node).
    pub seed: u64,
    /// Locality: 0 same rack, 1 same zone, 2 same region, 3 farther or unknown.
    pub distance: u8,
    pub holding: Holding,
    /// Bytes per second measured from it (0 when not yet measured).
    pub rate: f64,
    /// Round-trip time in seconds.
    pub rtt: f64,
    /// When its have-map last grew.
    pub grew: Instant,
    /// Faults counted against it: a puller with any owns no origin runs.
    pub faults: u32,
}

/// What became of one chunk asked of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Verified and stored: this many bytes.
    Stored(u32),
    /// Bytes that do not match the chunk.
    Bad,
    /// "Not here".
    Missing,
    /// The request failed (connection lost, refused).
    Lost,
}

/// What the scheduler asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<P> {
    /// Ask this co-puller for its current have-map.
    QueryHave(P),
    /// Ask a peer for these chunks (indexes; `bytes` in all). Each comes back as an
    /// [`Pull::on_peer`] outcome.
    Request {
        peer: P,
        chunks: Vec<usize>,
        bytes: u64,
    },
    /// Read these chunks from the origin; report with [`Pull::on_origin`].
    ReadOrigin { chunks: Vec<usize>, bytes: u64 },
    /// A request to this peer is late and was given to another source.
    Stalled(P),
}

/// What an [`Pull::on_peer`] outcome meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The chunk is done now (this many bytes from a peer).
    Done(u32),
    /// The peer said "not here" for a chunk its current have-map (or its whole copy)
    /// advertised: count it against the peer.
    Missed,
    /// Nothing new (a duplicate, a late answer, an outcome that only moved the chunk on).
    Nothing,
}

/// The origin failed some chunk [`Config::origin_tries`] times: the pull cannot finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GiveUp {
    pub chunk: usize,
}

/// Bytes a pull took from where.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fetched {
    pub from_peers: u64,
    pub from_origin: u64,
    /// Origin readers passed over for showing no sign of life (`Config::reader_lag` or a
    /// quiet spell), and of those, how many by `reader_lag`.
    pub readers_passed_over: u32,
    pub readers_passed_over_by_lag: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State<P> {
    Want,
    /// Requested from a peer; re-requested elsewhere once the deadline has passed and the
    /// peer has gone quiet.
    Peer(P, Instant),
    Origin,
    Done,
}

/// A chunk's state as stored (`State` without the peer's request).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tag {
    Want,
    Peer,
    Origin,
    Done,
}

/// Each chunk's state, with what the scans need kept in step with it: the chunks wanted (the
/// only ones a scan looks at), a bit each; and how many are wanted in each run (origin reads
/// look only at runs with some).
#[derive(Debug)]
struct Marks<P> {
    /// Each chunk's state, a byte each (a fleet simulation holds one per chunk per node); the
    /// peer and deadline of the chunks asked of a peer are in `asked`, bounded by the
    /// requests in flight.
    state: Vec<Tag>,
    asked: HashMap<usize, (P, Instant)>,
    want: Vec<u64>,
    run_want: Vec<u32>,
    /// A bit per word of `want`: set whenever that word may hold a chunk wanted and held by
    /// a peer in view (set as bits are wanted or peers gain chunks, cleared by the scan when
    /// it finds none), so a scan skips 4,096 chunks a bit.
    hint: Vec<u64>,
}

impl<P: PeerKey> Marks<P> {
    /// Moves chunk `i` (of run `run`) to `state`.
    fn set(&mut self, i: usize, run: usize, state: State<P>) {
        let tag = match state {
            State::Want => Tag::Want,
            State::Peer(p, d) => {
                self.asked.insert(i, (p, d));
                Tag::Peer
            }
            State::Origin => Tag::Origin,
            State::Done => Tag::Done,
        };
        if self.state[i] == Tag::Peer && tag != Tag::Peer {
            self.asked.remove(&i);
        }
        match (self.state[i] == Tag::Want, tag == Tag::Want) {
            (true, false) => self.run_want[run] -= 1,
            (false, true) => self.run_want[run] += 1,
            _ => {}
        }
        self.state[i] = tag;
        let (w, bit) = (i / 64, 1 << (i % 64));
        if state == State::Want {
            self.want[w] |= bit;
            self.flag(i);
        } else {
            self.want[w] &= !bit;
        }
    }

    /// Chunk `i`'s state.
    fn get(&self, i: usize) -> State<P> {
        match self.state[i] {
            Tag::Want => State::Want,
            Tag::Peer => {
                let (p, d) = self.asked[&i];
                State::Peer(p, d)
            }
            Tag::Origin => State::Origin,
            Tag::Done => State::Done,
        }
    }

    /// Flags the word of chunk `i` in `hint`: it may hold a chunk wanted and held.
    fn flag(&mut self, i: usize) {
        let w = i / 64;
        self.hint[w / 64] |= 1 << (w % 64);
    }
}

/// The sources in view and how they hold the version.
type View<P> = Vec<(P, Holding)>;

/// What a node's own runs were worked out for: the pullers, whether it reads alone, and how
/// many runs it had taken over.
type MyRunsFor<P> = ((Readers<P>, Readers<P>), bool, usize);

/// The origin readers (seed, key, how far into the version in bytes its runs begin).
type Readers<P> = Vec<(u64, P, u64)>;

/// The readers as chosen and as left, and the owner of each run among them.
type RunOwners<P> = ((Readers<P>, Readers<P>), Vec<P>);

#[derive(Debug)]
struct Entry {
    info: Source,
    have: Option<HaveMap>,
    /// The have-map came over the current connection (one from before a reconnection may
    /// claim chunks a restarted peer lost: used, but its misses are not held against it).
    fresh: bool,
}

/// The scheduler of one pull. See the module documentation.
#[derive(Debug)]
pub struct Pull<P> {
    cfg: Config,
    me: P,
    my_seed: u64,
    layout: Arc<Layout>,
    marks: Marks<P>,
    /// The owner of each run (by run number), for the pullers it was worked out for.
    owners: Option<RunOwners<P>>,
    /// Per run: whether this node would read it if its owner were left out (its successor).
    mine_if_out: Vec<bool>,
    /// The readers that own some run, worked out with `owners`.
    owning: HashSet<P>,
    /// When this node's listing says its pull began (its `started_ms`), as an instant.
    listed_at: Instant,
    remaining: usize,
    avoid: HashMap<usize, Vec<P>>,
    origin_tries: HashMap<usize, u32>,
    inflight: HashMap<P, u64>,
    sent_to: HashSet<(usize, P)>,
    origin_jobs: usize,
    started: Instant,
    last_poll: Option<Instant>,
    /// When [`Self::poll`] was last called (have-maps asked for or not).
    last_call: Option<Instant>,
    /// How many pullers have runs left to read from the origin, as counted at the last poll.
    readers: usize,
    poll_every: Duration,
    /// When each peer last delivered anything.
    heard: HashMap<P, Instant>,
    /// Peers with a request past its deadline that have answered nothing since: neither asked
    /// for more nor counted on to have anything (nor to read runs from the origin) until they
    /// answer. Without this, chunks only a silent peer advertises would wait for it forever.
    silent: HashSet<P>,
    sources: BTreeMap<P, Entry>,
    connected: usize,
    /// Peer requests by when they may be late: (when, chunk, the request's deadline). An
    /// entry whose chunk has moved on since (landed, or asked again with another deadline)
    /// is dropped when its time comes; a request whose peer is still sending is put back at
    /// the end of its quiet period. At most one entry per request made within the longest
    /// deadline, so bounded by what is in flight. A poll looks only at the entries due,
    /// never at every chunk in flight.
    late: BinaryHeap<Reverse<(Instant, usize, Instant)>>,
    /// The chunks any source in view holds, and the view it was worked out for (the sources,
    /// how they hold the version): kept up to date by have-deltas, worked out again only when
    /// the view changes or a bit is taken back. (A poll at 10 GiB and a dozen peers would
    /// otherwise OR some 50,000 words.)
    union: Option<(View<P>, Vec<u64>)>,
    /// The runs this node reads from the origin (it owns them, took them over, or reads
    /// alone), and what they were worked out for (the pullers, alone, how many taken).
    my_runs: Option<(MyRunsFor<P>, Vec<usize>)>,
    fetched: Fetched,
    /// The version's pullers as the driver's content routing knows them (None: the sources
    /// that announced a pull are all there are).
    members: Option<Vec<Puller<P>>>,
    /// Members this node was connected to and is not now (left, or banned by the driver):
    /// they read nothing for it.
    departed: HashSet<P>,
    /// When a chunk last landed, and the longest wait between landings (below the stuck
    /// threshold) seen so far.
    last_done: Instant,
    max_gap: Duration,
    /// When the oldest origin read in flight was issued (its time, when it lands, is a
    /// measure of how slow the origin is: learnt into `max_gap`).
    origin_since: Option<Instant>,
    /// Runs (by number) this node took over from an owner that let them wait too long.
    taken: HashSet<usize>,
    /// Quiet spells seen in earlier stalls of this pull, and in the current one: a stall
    /// after a stall goes further down the line of readers at once (the landings of others'
    /// takeovers end a stall without ending the wait for runs nobody took).
    stalls: usize,
    stall_spells: usize,
    /// When each member (a puller the content routing lists) was first among the chosen
    /// origin readers, and the members that showed a sign of life since (a chunk of a run it
    /// owns held by a peer in view other than itself) or were judged dead: a reader that
    /// shows none within a quiet spell of being chosen (or, chosen as this pull began, within
    /// twice what the slowest of the others took, `Config::reader_lag`) is left out *before*
    /// the readers are chosen, by every node alike (a node that does not exist, listed by a
    /// hostile member, shows none to anyone), and the next by rank reads in its place.
    /// Members judged dead stay so (a later sign may be another node's takeover of its
    /// runs). With each live one, how long it took to show life if it was chosen as this
    /// pull began.
    reader_since: HashMap<P, Instant>,
    /// Readers out of view whose runs have stayed mostly unread while the others' were read,
    /// and since when.
    behind: HashMap<P, Instant>,
    alive: HashMap<P, Option<Duration>>,
    dead: HashSet<P>,
}

impl<P: PeerKey> Pull<P> {
    /// A pull by node `me` (with rendezvous seed `my_seed`) of the chunks `missing` of the
    /// version laid out in `layout` (cut into runs of `cfg.run` chunks).
    pub fn new(
        cfg: Config,
        me: P,
        my_seed: u64,
        layout: Arc<Layout>,
        missing: &[usize],
        now: Instant,
    ) -> Pull<P> {
        assert_eq!(layout.run, cfg.run, "the layout's runs are the pull's");
        let n = layout.chunks();
        let mut marks = Marks {
            state: vec![Tag::Done; n],
            asked: HashMap::default(),
            want: vec![0u64; n.div_ceil(64)],
            run_want: vec![0u32; layout.runs()],
            hint: vec![0u64; n.div_ceil(64).div_ceil(64)],
        };
        for &i in missing {
            marks.set(i, layout.run_of[i], State::Want);
        }
        Pull {
            me,
            my_seed,
            layout,
            marks,
            owners: None,
            mine_if_out: Vec::new(),
            owning: HashSet::default(),
            listed_at: now,
            remaining: missing.len(),
            avoid: HashMap::default(),
            origin_tries: HashMap::default(),
            inflight: HashMap::default(),
            sent_to: HashSet::default(),
            origin_jobs: 0,
            started: now,
            last_poll: None,
            last_call: None,
            readers: usize::MAX,
            poll_every: cfg.have_poll,
            heard: HashMap::default(),
            silent: HashSet::default(),
            sources: BTreeMap::new(),
            connected: 0,
            late: BinaryHeap::new(),
            union: None,
            my_runs: None,
            fetched: Fetched::default(),
            members: None,
            departed: HashSet::default(),
            last_done: now,
            max_gap: Duration::ZERO,
            origin_since: None,
            taken: HashSet::default(),
            stalls: 0,
            stall_spells: 0,
            reader_since: HashMap::default(),
            behind: HashMap::default(),
            alive: HashMap::default(),
            dead: HashSet::default(),
            cfg,
        }
    }

    /// Chunks still to fetch.
    pub fn remaining(&self) -> usize {
        self.remaining
    }

    pub fn is_done(&self) -> bool {
        self.remaining == 0
    }

    pub fn fetched(&self) -> Fetched {
        self.fetched
    }

    /// How many peers are connected at all (with or without this version): while there are
    /// some, a fresh pull first lets their announcements arrive.
    pub fn set_connected(&mut self, n: usize) {
        self.connected = n;
    }

    /// Adds a peer that announced the version, or updates what is known of it (its have-map
    /// stays as it was).
    pub fn set_source(&mut self, peer: P, info: Source) {
        self.departed.remove(&peer);
        match self.sources.get_mut(&peer) {
            Some(e) => e.info = info,
            None => {
                self.sources.insert(
                    peer,
                    Entry {
                        info,
                        have: None,
                        fresh: false,
                    },
                );
            }
        }
    }

    /// A have-map from `peer` (`fresh`: sent over its current connection). Ignored for
    /// peers not added with [`Self::set_source`].
    pub fn set_have(&mut self, peer: P, have: Option<HaveMap>, fresh: bool) {
        if let Some(e) = self.sources.get_mut(&peer) {
            e.have = have;
            e.fresh = fresh;
            self.union = None;
        }
    }

    /// Chunks `peer` gained since its last have-map or delta ([`Config::have_deltas`]).
    /// Ignored for peers not added with [`Self::set_source`]; before its whole map, starts one.
    pub fn on_have(&mut self, peer: P, chunks: &[usize]) {
        let n = self.layout.lens.len();
        if let Some(e) = self.sources.get_mut(&peer) {
            let h = e.have.get_or_insert_with(|| HaveMap::new(n));
            for &i in chunks.iter().filter(|&&i| i < n) {
                h.set(i);
            }
            // The union takes the new bits if this peer is in the view it was made for.
            if let Some((view, u)) = &mut self.union {
                if view.iter().any(|(p, _)| *p == peer) {
                    for &i in chunks.iter().filter(|&&i| i < n) {
                        u[i / 64] |= 1 << (i % 64);
                        self.marks.flag(i);
                    }
                }
            }
        }
    }

    /// When this node's content routing listing says its pull began (the instant of its own
    /// [`Puller::started_ms`]), if before this `Pull` was made (the version's metadata was
    /// read first): other nodes' judgements of the readers are timed from their listings.
    pub fn set_listed_at(&mut self, at: Instant) {
        self.listed_at = at.min(self.started);
    }

    /// The version's pullers (seed, key) as the driver's content routing knows them, this
    /// node among them or not. The origin readers are chosen from these rather than from the
    /// sources in view, so nodes that see different neighbours agree on them; pass them
    /// whole, the ones this node banned too (the scheduler leaves out those it saw fail or
    /// leave only after choosing). None: the sources that announced a pull are all the
    /// pullers there are (a full mesh).
    pub fn set_pullers(&mut self, pullers: Option<Vec<Puller<P>>>) {
        if let Some(m) = &pullers {
            self.departed.retain(|d| m.iter().any(|p| p.id == *d));
            // Bounded by what was listed lately (a roster of a few dozen).
            if self.reader_since.len() > 4 * m.len() + 64 {
                self.reader_since
                    .retain(|k, _| m.iter().any(|p| p.id == *k));
            }
        } else {
            self.departed.clear();
        }
        self.members = pullers;
    }

    /// Bytes that may be in flight to a peer measured at `rate` bytes per second.
    fn window(&self, rate: f64) -> u64 {
        let w = (rate * self.cfg.window_time.as_secs_f64()) as u64;
        w.clamp(
            self.cfg.peer_window_min,
            self.cfg.peer_window.max(self.cfg.peer_window_min),
        )
    }

    /// Until when readers count as chosen as this pull began (its settling period): those
    /// are all timed from the same moment (`Config::reader_lag`).
    fn began(&self) -> Instant {
        self.started + self.cfg.settle
    }

    /// How long landings may pause before this node reads a wanted chunk nobody in view has.
    fn stuck_after(&self) -> Duration {
        self.cfg.stuck.max(self.max_gap * 4)
    }

    /// A chunk landed at `now`. The pause before it is learnt when under half the stuck
    /// threshold: a longer one most likely ended with another node's takeover after its own
    /// quiet spell (about as long as this node's), and learnt, it stretched the next spell
    /// fourfold, the one after that again (staggered pulls with liars among the readers took
    /// 17-31 s, each spell longer than the last).
    fn landed(&mut self, now: Instant) {
        let gap = now.saturating_duration_since(self.last_done);
        if gap < self.stuck_after() / 2 {
            self.max_gap = self.max_gap.max(gap);
        }
        self.last_done = self.last_done.max(now);
        self.stalls += std::mem::take(&mut self.stall_spells);
    }

    /// A peer left (disconnected, banned, or withdrew the version). Its requests in flight
    /// come back through [`Self::on_peer`] as the driver learns of them.
    pub fn remove_source(&mut self, peer: &P) {
        self.sources.remove(peer);
        self.silent.remove(peer);
        if let Some(m) = &self.members {
            if m.iter().any(|p| p.id == *peer) {
                self.departed.insert(*peer);
            }
        }
    }

    /// The sources now known, for drivers that sync a table into the scheduler.
    pub fn sources(&self) -> impl Iterator<Item = &P> {
        self.sources.keys()
    }

    /// When to call [`Self::poll`] next at the latest (it is also due after any input).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.remaining == 0 {
            return None;
        }
        let Some(last) = self.last_poll else {
            return Some(self.started);
        };
        let mut t = last + self.poll_every;
        if let Some(Reverse((late, _, _))) = self.late.peek() {
            t = t.min(*late);
        }
        // The end of the settling period, when origin reads may start.
        // (Once: a poll at or after it has seen it; without this, a poll in between would
        // be asked for again and again at that instant.)
        let settle_end = self.started + self.cfg.settle;
        if self.connected > 0 && self.last_call.is_none_or(|c| c < settle_end) {
            t = t.min(settle_end);
        }
        Some(t)
    }

    /// Decides what to do now: the actions to carry out, in order.
    pub fn poll(&mut self, now: Instant) -> Vec<Action<P>> {
        let mut out = Vec::new();
        if self.remaining == 0 {
            return out;
        }
        self.last_call = Some(now);
        let cfg = &self.cfg;
        let n = self.layout.lens.len();
        let polled = self
            .last_poll
            .is_none_or(|t| now.saturating_duration_since(t) >= self.poll_every);
        if polled {
            self.last_poll = Some(now);
            for (p, e) in &self.sources {
                if e.info.holding == Holding::Pulling && (!cfg.have_deltas || e.have.is_none()) {
                    out.push(Action::QueryHave(*p));
                }
            }
        }

        // Who has what, as last heard; who is pulling (for origin offload).
        let mut views: Vec<(P, &Entry)> = Vec::new();
        let mut pullers = vec![(self.my_seed, self.me)];
        // Readers taken in order from the content routing's list, already bounded.
        let mut ordered = false;
        // How long readers chosen as this pull began have to show life, once judged by it.
        let mut frame_lag: Option<Duration> = None;
        // Pullers seen to fail: they read nothing for the others (their runs are taken over).
        let mut failing: Vec<P> = Vec::new();
        let (mut announced, mut unmapped) = (0, 0);
        for (p, e) in &self.sources {
            announced += 1;
            if self.silent.contains(p) {
                failing.push(*p);
                if e.info.holding == Holding::Pulling {
                    pullers.push((e.info.seed, *p));
                }
                continue;
            }
            match e.info.holding {
                Holding::Complete => views.push((*p, e)),
                Holding::Pulling => {
                    if e.have.is_none() {
                        unmapped += 1;
                    }
                    // A puller with faults (repeated "not here" for what it advertised, bad
                    // bytes) or whose map stopped growing reads nothing for the others.
                    pullers.push((e.info.seed, *p));
                    if now.saturating_duration_since(e.info.grew) >= cfg.puller_idle
                        || e.info.faults > 0
                    {
                        failing.push(*p);
                    }
                    if e.have.as_ref().is_some_and(|h| h.len as usize == n) {
                        views.push((*p, e));
                    }
                }
                Holding::Mounted => {}
            }
        }
        if let Some(members) = &self.members {
            // Readers with no sign of life a quiet spell after they were chosen are dead, or
            // sooner, when they lag far behind the others (`Config::reader_lag`).
            // (Only among the readers chosen as this pull began, all timed from the same
            // moment: one chosen later may be a newcomer whose first reads take an origin's
            // round, or one long under way whose runs show at once.)
            let spell = self.stuck_after();
            let early = self.began();
            // Listed pullers in view with no fault caught are alive (judged by what this node
            // sees of them), before anything is judged here: a node whose first poll comes
            // after another node passed a reader over then judges by the same frame rather
            // than take the other's reads for the reader's own (below).
            for m in members {
                if m.id != self.me
                    && !self.alive.contains_key(&m.id)
                    && !self.dead.contains(&m.id)
                    && views.iter().any(|(p, e)| *p == m.id && e.info.faults == 0)
                {
                    let since = self.reader_since.get(&m.id).copied().unwrap_or(now);
                    let took = (since <= early).then(|| now.saturating_duration_since(since));
                    self.alive.insert(m.id, took);
                }
            }
            // A reader that owns no run (its runs begin past the version's end, or it won
            // none) cannot show life: it is neither waited for nor judged.
            let owns = |p: &P| self.owners.is_none() || self.owning.contains(p);
            // Shown: every reader alive, chosen as the pull began or since (a node whose pull
            // began before the others sees them come in later; counting only the first, it
            // judged nobody by lag, took others' reads of a phantom's runs for the phantom's
            // own, and pulls started 700 ms apart took 31-33 s). The slowest: of the first.
            let shown = self.alive.len();
            let slowest = self.alive.values().filter_map(|t| *t).max();
            let waiting = self
                .reader_since
                .iter()
                .filter(|(p, t)| **t <= early && !self.alive.contains_key(p))
                .filter(|(p, _)| !self.dead.contains(p) && owns(p))
                .count();
            // All but an eighth of them (at least one) have shown life: the rest have twice
            // what the slowest of those took (at least `reader_lag`). Readers served unevenly
            // by a slow origin show life at different times; the last few of an honest set
            // are not far behind the slowest that did.
            let lag = (shown >= 3 && waiting <= (shown + waiting).div_ceil(8))
                .then(|| spell.min((slowest.unwrap_or_default() * 2).max(cfg.reader_lag)));
            frame_lag = lag;
            for Puller { id: p, .. } in members {
                if *p == self.me || self.alive.contains_key(p) || self.dead.contains(p) || !owns(p)
                {
                    continue;
                }
                let Some(since) = self.reader_since.get(p) else {
                    continue;
                };
                let waited = now.saturating_duration_since(*since);
                let by_lag = *since <= early && lag.is_some_and(|l| waited >= l);
                if waited >= spell || by_lag {
                    self.fetched.readers_passed_over += 1;
                    if waited < spell {
                        self.fetched.readers_passed_over_by_lag += 1;
                    }
                    self.dead.insert(*p);
                }
            }
            let dead = &self.dead;
            let listed: Vec<(u64, P)> = members
                .iter()
                .filter(|p| p.id != self.me && !dead.contains(&p.id))
                .map(|p| (p.seed, p.id))
                .collect();
            // Every listed puller dead (a roster filled with nodes that do not exist): the
            // pullers in view, as in a full mesh, rather than this node alone.
            if !listed.is_empty() || members.iter().all(|p| p.id == self.me) {
                pullers = if cfg.readers_in_order {
                    // The first `origin_readers` listed that are not dead, with the dead met
                    // on the way: those keep their place (where the runs of the others begin
                    // does not move) and their runs go to the others, by rendezvous.
                    let mut v: Vec<(u64, P)> = Vec::new();
                    let mut live = 0;
                    for m in members {
                        if live >= cfg.origin_readers.max(1) {
                            break;
                        }
                        v.push((m.seed, m.id));
                        if !dead.contains(&m.id) {
                            live += 1;
                        }
                    }
                    // Unlisted, this node started after every puller listed. With room in
                    // the listing it is not listed yet, and comes next; with none, others
                    // may have started before it that it cannot see (each such node taking
                    // itself for the next reader would read what the others read: a roster
                    // filled with early phantoms, 1.29x), so it reads only once every listed
                    // puller is dead, with the pullers in view (above).
                    let room = members.len() < cfg.origin_readers + SPARE_READERS;
                    if room
                        && live < cfg.origin_readers.max(1)
                        && !members.iter().any(|m| m.id == self.me)
                    {
                        v.push((self.my_seed, self.me));
                    }
                    ordered = true;
                    v
                } else {
                    listed
                        .into_iter()
                        .chain([(self.my_seed, self.me)])
                        .collect()
                };
            }
        }
        // The origin readers: the first few by rendezvous on the version, less those seen to
        // fail (chosen before, not after, leaving those out: then only a failing reader's
        // runs move, and nodes that saw it fail and nodes that did not still agree on the
        // owner of every other run).
        if !ordered && pullers.len() > cfg.origin_readers.max(1) {
            let key = self.layout.key;
            if !(cfg.readers_in_order && self.members.is_some()) {
                pullers.sort_by_key(|(seed, p)| (std::cmp::Reverse(mix(seed ^ key)), *p));
            }
            pullers.truncate(cfg.origin_readers.max(1));
        }
        // Where each reader's runs may begin: a reader that started later than the first
        // owns no run before what the origin could have given the readers since
        // (`Config::origin_pace`). From the start times the pullers gave; worked out before
        // leaving out those seen to fail, like the readers themselves, so that every node
        // agrees whatever it saw.
        let size = self.layout.size;
        let mut pullers: Readers<P> = match (&self.members, cfg.readers_in_order) {
            (Some(members), true) if cfg.origin_pace > 0 => {
                let start = |p: &P| members.iter().find(|m| m.id == *p).map(|m| m.started_ms);
                // This node unlisted yet: it started after every puller listed.
                let last = members.iter().map(|m| m.started_ms).max().unwrap_or(0);
                let starts: Vec<u64> = pullers
                    .iter()
                    .map(|(_, p)| start(p).unwrap_or(last))
                    .collect();
                // In order of start: each reader's runs begin where the previous one's did,
                // plus what the origin could give in between, but at most a `PACE_LEAD`th of
                // the version further on (past the end, it owns none).
                let mut by_start: Vec<usize> = (0..starts.len()).collect();
                by_start.sort_by_key(|&i| starts[i]);
                let mut from = vec![0u64; starts.len()];
                let mut prev: Option<(u64, u64)> = None;
                for i in by_start {
                    let at = starts[i];
                    from[i] = match prev {
                        None => 0,
                        Some((at0, from0)) => {
                            let ms = (at - at0) as u128;
                            let gained = (ms * cfg.origin_pace as u128 / 1000)
                                .min((size / PACE_LEAD) as u128);
                            (from0 + gained as u64).min(size)
                        }
                    };
                    prev = Some((at, from[i]));
                }
                pullers
                    .iter()
                    .zip(from)
                    .map(|(&(seed, p), from)| (seed, p, from))
                    .collect()
            }
            _ => pullers.iter().map(|&(seed, p)| (seed, p, 0)).collect(),
        };
        if self.members.is_some() {
            for (_, p, _) in &pullers {
                if *p != self.me {
                    self.reader_since.entry(*p).or_insert(now);
                }
            }
        }
        // The readers as chosen, where their runs begin, before leaving out those this node
        // saw fail or judged dead: each run's owner is worked out among these (every node
        // alike), and only the runs of one this node left out move, by rendezvous among the
        // rest.
        let mut chosen = pullers.clone();
        chosen.sort_by_key(|p| p.1);
        pullers.retain(|(_, p, _)| {
            !failing.contains(p) && !self.departed.contains(p) && !self.dead.contains(p)
        });
        if pullers.is_empty() {
            pullers.push((self.my_seed, self.me, 0));
        }
        let alone = pullers.len() == 1 && pullers[0].1 == self.me;
        pullers.sort_by_key(|p| p.1);
        let settle = now.saturating_duration_since(self.started) < cfg.settle
            && self.connected > 0
            && (announced == 0 || unmapped > 0);

        let has_chunk = |e: &Entry, i: usize| {
            e.info.holding == Holding::Complete || e.have.as_ref().is_some_and(|h| h.get(i))
        };
        // Which chunks some view has (before what is avoided): a scan skips the rest at once.
        let words = self.marks.want.len();
        let view: View<P> = views.iter().map(|(p, e)| (*p, e.info.holding)).collect();
        let union = match self.union.take() {
            Some((v, u)) if v == view => u,
            _ => {
                self.marks.hint.fill(u64::MAX);
                held_by(words, views.iter().map(|(_, e)| *e))
            }
        };
        let in_union = |i: usize| bit(&union, i);
        // Each run's owner, worked out again only when the readers change.
        if self
            .owners
            .as_ref()
            .is_none_or(|(for_, _)| for_.0 != chosen || for_.1 != pullers)
        {
            let mut mine_if_out = Vec::with_capacity(self.layout.run_pos.len());
            let layout = &self.layout;
            let owners: Vec<P> = (layout.run_key.iter().zip(&layout.run_pos))
                .map(|(&key, &at)| {
                    let rank = |r: &&(u64, P, u64)| mix(r.0 ^ key);
                    let owner = chosen
                        .iter()
                        .filter(|r| r.2 <= at)
                        .max_by_key(rank)
                        .map(|r| r.1)
                        .expect("the first reader owns from the beginning");
                    // Its successor among the rest, by rendezvous on the run (so the extra
                    // reads of a reader that fails spread over all the others). Whether this
                    // node would read it in the owner's place: as that successor, or as the
                    // reader that comes in for the owner, ranking above it.
                    let next = pullers.iter().filter(|r| r.1 != owner).max_by_key(rank);
                    mine_if_out.push(next.is_none_or(|n| {
                        n.1 == self.me || mix(self.my_seed ^ key) >= mix(n.0 ^ key)
                    }));
                    if pullers.iter().any(|r| r.1 == owner) {
                        owner
                    } else {
                        next.map_or(self.me, |n| n.1)
                    }
                })
                .collect();
            self.mine_if_out = mine_if_out;
            self.owning = owners.iter().copied().collect();
            self.owners = Some(((chosen.clone(), pullers.clone()), owners));
        }
        let run_owner = &self.owners.as_ref().expect("just set").1;
        // Signs of life of the readers out of view: a chunk of a run one owns, held by a peer
        // other than itself (its own map may claim anything). Only while a reader is
        // undecided, and not in the last `settle` of its quiet spell: nodes that chose it a
        // little earlier (their pulls began earlier) have judged it dead by then and read its
        // runs themselves, and their reads would pass for its own (a roster of phantoms: one
        // node of four kept six for alive and read nothing of its share until its next quiet
        // spell).
        if let (true, Some(members)) = (polled, &self.members) {
            let spell = self.stuck_after();
            let early = self.began();
            let start_of = |p: &P| members.iter().find(|m| m.id == *p).map(|m| m.started_ms);
            let mine = start_of(&self.me);
            let earliest = self.alive.keys().filter_map(start_of).chain(mine).min();
            let ahead =
                Duration::from_millis(mine.zip(earliest).map_or(0, |(m, e)| m.saturating_sub(e)));
            let late = |p: &P| {
                self.reader_since
                    .get(p)
                    .is_some_and(|t| now.saturating_duration_since(*t) + cfg.settle >= spell)
            };
            let undecided: Vec<P> = pullers
                .iter()
                .map(|r| r.1)
                .filter(|p| *p != self.me && !self.alive.contains_key(p) && !self.dead.contains(p))
                .filter(|p| !late(p))
                .collect();
            for o in undecided {
                // In view with no fault caught, a reader is judged by what this node sees of
                // it (faults, silence, a map that stops growing), not by signs through others:
                // honest readers spend their first second settling, and seen through the
                // others' maps only, one whose runs they fetched last showed life late enough
                // to be passed over in a pull of a second (up to 1.5x the version read).
                let in_view = views.iter().any(|(p, e)| *p == o && e.info.faults == 0);
                // Through the others, a run of its is its own sign only while nobody else
                // can have read it in its place: a node whose pull began earlier judges it
                // by the same rule, and once it has, its reads of the runs would pass for the
                // reader's own here (a phantom reader cost real pulls 1.3 to 24 s that way).
                // After that, only the runs this node would read in its place count (nobody
                // else would). From the start times: this node began `ahead` after the
                // earliest reader it knows to live.
                let since = self.reader_since.get(&o).copied().unwrap_or(now);
                let any_run = since > early
                    || frame_lag
                        .and_then(|l| self.listed_at.checked_add(l))
                        .is_none_or(|judged| now + ahead + cfg.settle / 10 < judged);
                let shown = in_view || {
                    let others = held_by(
                        words,
                        views.iter().filter(|(p, _)| *p != o).map(|(_, e)| *e),
                    );
                    self.layout
                        .run_chunks()
                        .enumerate()
                        .filter(|(k, _)| run_owner[*k] == o && (any_run || self.mine_if_out[*k]))
                        .any(|(_, run)| run.iter().any(|&i| bit(&others, i)))
                };
                if shown {
                    let took =
                        (since <= self.began()).then(|| now.saturating_duration_since(since));
                    self.alive.insert(o, took);
                }
            }
            // Readers out of view judged alive through the others' maps may owe that to
            // nodes that saw them fail and read their runs in their place (a liar among the
            // readers: the nodes in its view catch its faults at once). Such a reader's share
            // stays mostly unread while the others' is read: once the other readers' runs are
            // nine tenths here and a quarter of its own are not, for `reader_lag`, it is passed
            // over (64 nodes with six liars, 1,000 with ten and churn: pulls of 16-36 s;
            // `Duration::MAX` turns it off with the rest of the lag rule).
            let mut left: HashMap<P, (u64, u64)> = HashMap::default();
            let wanted = self.marks.run_want.iter().zip(run_owner);
            for (k, (&want, owner)) in wanted.enumerate() {
                let e = left.entry(*owner).or_default();
                e.0 += want as u64;
                e.1 += self.layout.run_span(k).len() as u64;
            }
            let (want, all) = left
                .iter()
                .filter(|(p, _)| **p != self.me)
                .fold((0, 0), |(w, a), (_, (x, y))| (w + x, a + y));
            for (&o, &(want_o, all_o)) in &left {
                let behind = o != self.me
                    && !views.iter().any(|(p, _)| *p == o)
                    && self.reader_since.get(&o).is_some_and(|t| *t <= early)
                    && want_o * 4 >= all_o
                    && (want - want_o) * 10 <= all - all_o;
                if !behind {
                    self.behind.remove(&o);
                    continue;
                }
                let since = *self.behind.entry(o).or_insert(now);
                if now.saturating_duration_since(since) >= cfg.reader_lag && self.dead.insert(o) {
                    self.alive.remove(&o);
                    self.fetched.readers_passed_over += 1;
                    self.fetched.readers_passed_over_by_lag += 1;
                }
            }
        }
        if polled {
            let owners =
                origin_readers(&self.layout, &self.marks.state, in_union, |k| run_owner[k]);
            self.readers = owners.len();
            self.poll_every = if owners.contains(&self.me) || pullers.len() == 1 {
                cfg.have_poll
            } else {
                cfg.have_poll_waiting
            };
        }
        // This reader's share of the origin: `origin_parallel` reads of `origin_batch` among
        // the readers with runs left, in at least `origin_per_reader` reads of at least half a
        // batch each.
        let share = self.readers.clamp(1, pullers.len());
        let jobs = (cfg.origin_parallel / share).max(cfg.origin_per_reader.max(1));
        let batch_bytes = (cfg.origin_parallel as u64 * cfg.origin_batch / (share * jobs) as u64)
            .clamp(cfg.origin_batch / 2, cfg.origin_batch.max(1));
        let origin_free = self.origin_jobs < jobs;

        // Assign wanted chunks.
        // Bytes queued to a peer: in flight, plus what this scan gives it.
        let inflight = &self.inflight;
        let queued = |p: &P, planned: &BTreeMap<P, u64>| {
            inflight.get(p).copied().unwrap_or(0) + planned.get(p).copied().unwrap_or(0)
        };
        let mut planned: BTreeMap<P, u64> = BTreeMap::new();
        let mut batches: BTreeMap<P, (Vec<usize>, u64)> = BTreeMap::new();
        let mut full: Vec<(P, Vec<usize>, u64)> = Vec::new();
        // Requests past their deadline whose peer has also gone quiet: ask someone else too
        // (whichever good copy comes first wins), and count nothing more on that peer until
        // it answers.
        let mut stalled = Vec::new();
        while let Some(&Reverse((due, i, deadline))) = self.late.peek() {
            if due > now {
                break;
            }
            self.late.pop();
            let State::Peer(p, d) = self.marks.get(i) else {
                continue;
            };
            if d != deadline {
                continue;
            }
            let quiet_until = self.heard.get(&p).map(|t| *t + cfg.quiet);
            let late_at = quiet_until.map_or(deadline, |q| q.max(deadline));
            if now < late_at {
                self.late.push(Reverse((late_at, i, deadline)));
                continue;
            }
            if !stalled.contains(&p) {
                stalled.push(p);
            }
            self.silent.insert(p);
            self.avoid.entry(i).or_default().push(p);
            self.marks.set(i, self.layout.run_of[i], State::Want);
        }
        // Peers with room in their window: once there are none, the scan stops.
        let windows: BTreeMap<P, u64> = views
            .iter()
            .map(|(p, e)| (*p, self.window(e.info.rate)))
            .collect();
        let room = |p: &P, planned: &BTreeMap<P, u64>| queued(p, planned) < windows[p];
        let mut has_room: Vec<bool> = views.iter().map(|(p, _)| room(p, &planned)).collect();
        let mut open = has_room.iter().filter(|r| **r).count();
        // The views by locality, nearest first: a chunk goes to the nearest tier that holds
        // it, so the scan need only look at chunks held by a peer with room and by none
        // nearer (or at chunks some peer was passed over for, which may go further).
        let mut tiers: Vec<(u8, Vec<usize>)> = Vec::new();
        for (k, (_, e)) in views.iter().enumerate() {
            match tiers.iter_mut().find(|(d, _)| *d == e.info.distance) {
                Some((_, v)) => v.push(k),
                None => tiers.push((e.info.distance, vec![k])),
            }
        }
        tiers.sort_by_key(|(d, _)| *d);
        let word_of = |e: &Entry, w: usize| match (&e.info.holding, &e.have) {
            (Holding::Complete, _) => u64::MAX,
            (_, Some(h)) => h.words.get(w).copied().unwrap_or(0),
            _ => 0,
        };
        let mut passed_over: HashMap<usize, u64> = HashMap::default();
        for &i in self.avoid.keys() {
            *passed_over.entry(i / 64).or_default() |= 1 << (i % 64);
        }
        // Each node scans from its own place (by its seed): co-pullers ask their holders for
        // different chunks first, so they soon hold different chunks to trade among
        // themselves rather than all waiting on the same few holders (the diversity BitTorrent
        // gets from rarest-first). Simulated, 64 nodes with 1 MiB windows: p99 1.12 s against
        // 1.33 s scanning from the start.
        // A word at a time, with the peers' room as it is when the scan reaches that word:
        // the work is a few operations per word and view, and then only the chunks that can
        // be asked (not every chunk held by some peer: at 10 GiB, with the nearest peers'
        // windows full, that was most of the simulator's time).
        let nw = self.marks.want.len();
        let rot = (mix(self.my_seed) % nw.max(1) as u64) as usize;
        // Wanted and held by someone in view: in a cold pull, the few words between what the
        // origin readers have and what this node has.
        let mut at = rot;
        let mut end = nw;
        'scan: while open > 0 {
            let w = match next_bit(&self.marks.hint, at, end) {
                Some(w) => w,
                None if end == nw && rot > 0 => {
                    (at, end) = (0, rot);
                    continue;
                }
                None => break,
            };
            at = w + 1;
            let want = self.marks.want[w] & union[w];
            if want == 0 {
                self.marks.hint[w / 64] &= !(1 << (w % 64));
                continue;
            }
            let (mut nearer, mut askable, mut any_room) = (0u64, 0u64, 0u64);
            for (_, ks) in &tiers {
                let (mut all, mut roomy) = (0u64, 0u64);
                for &k in ks {
                    let h = word_of(views[k].1, w);
                    all |= h;
                    if has_room[k] {
                        roomy |= h;
                    }
                }
                askable |= roomy & !nearer;
                any_room |= roomy;
                nearer |= all;
            }
            askable |= passed_over.get(&w).copied().unwrap_or(0) & any_room;
            let mut bits = want & askable;
            while bits != 0 {
                let i = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if open == 0 {
                    break 'scan;
                }
                if self.marks.state[i] != Tag::Want {
                    continue;
                }
                let avoided = self.avoid.get(&i);
                let has =
                    |p: &P, e: &Entry| has_chunk(e, i) && avoided.is_none_or(|a| !a.contains(p));
                let Some(tier) = views
                    .iter()
                    .filter(|(p, e)| has(p, e))
                    .map(|(_, e)| e.info.distance)
                    .min()
                else {
                    continue;
                };
                let cost = |p: &P, e: &Entry, planned: &BTreeMap<P, u64>| {
                    e.info.rtt + queued(p, planned) as f64 / e.info.rate.max(50e6)
                };
                let pick = views
                    .iter()
                    .enumerate()
                    .filter(|(k, (p, e))| has(p, e) && e.info.distance == tier && has_room[*k])
                    .min_by(|(_, (a, ea)), (_, (b, eb))| {
                        cost(a, ea, &planned).total_cmp(&cost(b, eb, &planned))
                    })
                    .map(|(k, (p, e))| (k, *p, e.info.rate));
                if let Some((k, p, rate)) = pick {
                    let b = batches.entry(p).or_default();
                    b.0.push(i);
                    b.1 += self.layout.lens[i] as u64;
                    *planned.entry(p).or_default() += self.layout.lens[i] as u64;
                    let q = queued(&p, &planned);
                    if !room(&p, &planned) {
                        has_room[k] = false;
                        open -= 1;
                    }
                    let deadline = now
                        + cfg.deadline_slack
                        + Duration::from_secs_f64(q as f64 / rate.max(20e6));
                    self.marks
                        .set(i, self.layout.run_of[i], State::Peer(p, deadline));
                    self.late.push(Reverse((deadline, i, deadline)));
                    if b.0.len() >= cfg.peer_ids || b.1 >= cfg.peer_batch {
                        let (ids, bytes) = std::mem::take(b);
                        full.push((p, ids, bytes));
                    }
                }
            }
        }

        // Chunks no peer has: from the origin, if this node is their run's reader.
        let mut origin_batch: Vec<usize> = Vec::new();
        let mut origin_bytes = 0u64;
        // Nothing landed for too long while chunks nobody in view has are wanted: their
        // owner is not delivering (or not to anyone this node can see). Its runs go to the
        // next owner among the readers without it (the same node for everyone) after one such
        // spell, to the one after that after two (the next owner failing too), and to
        // everyone who waits for them after three, the spells of earlier stalls counted in
        // (landings of others' takeovers end a stall, not the wait for runs nobody took).
        // (Before anything has landed, a slow origin's first reads may simply take long.)
        let begun = self.max_gap > Duration::ZERO
            || self.last_done > self.started
            || now.saturating_duration_since(self.started) >= cfg.stuck * 4;
        let quiet = now.saturating_duration_since(self.last_done);
        if !settle && begun && quiet >= self.stuck_after() {
            let spells = (quiet.as_secs_f64() / self.stuck_after().as_secs_f64()) as usize;
            let mut took = false;
            for (k, run) in self.layout.run_chunks().enumerate() {
                let owner = run_owner[k];
                if owner == self.me || self.taken.contains(&k) || self.marks.run_want[k] == 0 {
                    continue;
                }
                let waiting = run
                    .iter()
                    .any(|&i| self.marks.state[i] == Tag::Want && !in_union(i));
                if !waiting {
                    continue;
                }
                // This node's place in the line of readers after the owner.
                let mut rest: Vec<(u64, P)> = pullers
                    .iter()
                    .filter(|r| r.1 != owner)
                    .map(|r| (r.0, r.1))
                    .collect();
                let key = self.layout.run_key[k];
                rest.sort_by_key(|(seed, p)| (std::cmp::Reverse(mix(seed ^ key)), *p));
                let place = rest
                    .iter()
                    .position(|p| p.1 == self.me)
                    .unwrap_or(rest.len());
                if self.stalls + spells > place.min(2) {
                    self.taken.insert(k);
                    took = true;
                }
            }
            self.stall_spells = self.stall_spells.max(spells);
            if took {
                // Counted from now: more taken over only after another quiet spell.
                self.last_done = now;
                self.stalls += std::mem::take(&mut self.stall_spells);
            }
        }
        if !settle && origin_free {
            // With a peer holding the whole version, only chunks every such peer was found
            // late on can need the origin: look at those, not at every chunk. Otherwise, the
            // runs this node reads that still want a chunk, in pack order.
            let complete = views
                .iter()
                .any(|(_, e)| e.info.holding == Holding::Complete);
            let (late, runs): (Vec<usize>, Vec<usize>) = if complete {
                let mut c: Vec<usize> = self.avoid.keys().copied().collect();
                c.sort_by_key(|&i| (self.layout.run_of[i], i));
                (c, Vec::new())
            } else {
                let key = ((chosen.clone(), pullers.clone()), alone, self.taken.len());
                if self.my_runs.as_ref().is_none_or(|(k, _)| *k != key) {
                    let mine = (0..self.marks.run_want.len())
                        .filter(|&k| alone || run_owner[k] == self.me || self.taken.contains(&k))
                        .collect();
                    self.my_runs = Some((key, mine));
                }
                let runs = self.my_runs.as_ref().expect("just set").1.iter();
                let runs = runs
                    .copied()
                    .filter(|&k| self.marks.run_want[k] > 0)
                    .collect();
                (Vec::new(), runs)
            };
            let porder = &self.layout.porder;
            let candidates = late.into_iter().chain(
                runs.into_iter()
                    .flat_map(|k| self.layout.run_span(k))
                    .map(|pos| porder[pos]),
            );
            for i in candidates {
                if origin_bytes >= batch_bytes {
                    break;
                }
                let k = self.layout.run_of[i];
                let mine = alone || run_owner[k] == self.me || self.taken.contains(&k);
                if self.marks.state[i] != Tag::Want || !mine {
                    continue;
                }
                if in_union(i) {
                    let avoided = self.avoid.get(&i);
                    let on_peer = views
                        .iter()
                        .any(|(p, e)| has_chunk(e, i) && avoided.is_none_or(|a| !a.contains(p)));
                    if on_peer {
                        continue;
                    }
                }
                {
                    self.marks.set(i, k, State::Origin);
                    origin_batch.push(i);
                    origin_bytes += self.layout.lens[i] as u64;
                }
            }
        }
        drop(views);
        self.union = Some((view, union));
        // Entries whose request was answered since: dropped from the top now, so that
        // `poll_timeout` names the next request that can really be late (left there, each
        // would wake the node once at its deadline for nothing: thousands a second at
        // 10 Gbit).
        while let Some(&Reverse((_, i, deadline))) = self.late.peek() {
            if matches!(self.marks.get(i), State::Peer(_, d) if d == deadline) {
                break;
            }
            self.late.pop();
        }

        for p in stalled {
            out.push(Action::Stalled(p));
        }
        let batches = full
            .into_iter()
            .chain(batches.into_iter().map(|(p, (ids, bytes))| (p, ids, bytes)));
        for (peer, chunks, bytes) in batches {
            if chunks.is_empty() {
                continue;
            }
            *self.inflight.entry(peer).or_default() += bytes;
            for &i in &chunks {
                self.sent_to.insert((i, peer));
            }
            out.push(Action::Request {
                peer,
                chunks,
                bytes,
            });
        }
        if !origin_batch.is_empty() {
            if self.origin_jobs == 0 {
                self.origin_since = Some(now);
            }
            self.origin_jobs += 1;
            out.push(Action::ReadOrigin {
                chunks: origin_batch,
                bytes: origin_bytes,
            });
        }
        out
    }

    /// Moves chunk `i` to `state`.
    fn set(&mut self, i: usize, state: State<P>) {
        self.marks.set(i, self.layout.run_of[i], state);
    }

    /// What became of chunk `i` asked of `peer`.
    pub fn on_peer(&mut self, now: Instant, peer: P, i: usize, outcome: Outcome) -> Delivery {
        self.heard.insert(peer, now);
        if outcome != Outcome::Lost {
            self.silent.remove(&peer);
        }
        if i >= self.marks.state.len() || !self.sent_to.remove(&(i, peer)) {
            return Delivery::Nothing;
        }
        let len = self.layout.lens[i] as u64;
        if let Some(n) = self.inflight.get_mut(&peer) {
            *n = n.saturating_sub(len);
        }
        let mut delivery = Delivery::Nothing;
        match outcome {
            Outcome::Stored(n) => {
                if self.marks.state[i] != Tag::Done {
                    self.set(i, State::Done);
                    self.remaining -= 1;
                    self.fetched.from_peers += n as u64;
                    self.landed(now);
                    return Delivery::Done(n);
                }
                return Delivery::Nothing;
            }
            Outcome::Bad => {}
            Outcome::Missing => {
                // It was asked because it said it had the chunk (whole version, or the bit in
                // its have-map): a stale map now and then, a lie if it keeps happening. Forget
                // that bit; the driver counts it against the peer.
                if let Some(e) = self.sources.get_mut(&peer) {
                    let had = e.have.as_mut().is_some_and(|h| {
                        let had = h.get(i);
                        h.clear(i);
                        had
                    });
                    if had {
                        self.union = None;
                    }
                    if e.info.holding == Holding::Complete || (had && e.fresh) {
                        delivery = Delivery::Missed;
                    }
                }
            }
            Outcome::Lost => {
                self.inflight.remove(&peer);
            }
        }
        self.avoid.entry(i).or_default().push(peer);
        if self.marks.state[i] != Tag::Done {
            self.set(i, State::Want);
        }
        delivery
    }

    /// An origin read of `chunks` (`bytes` in all) finished at `now`; `held(i)` says whether
    /// chunk `i` is stored now (all of them when the read succeeded; on failure, part of a
    /// batch may have landed). Returns the chunks newly done, or [`GiveUp`] once a chunk has failed
    /// [`Config::origin_tries`] times.
    pub fn on_origin(
        &mut self,
        now: Instant,
        chunks: &[usize],
        bytes: u64,
        ok: bool,
        held: impl Fn(usize) -> bool,
    ) -> Result<Vec<usize>, GiveUp> {
        self.origin_jobs = self.origin_jobs.saturating_sub(1);
        if let Some(since) = self.origin_since {
            self.max_gap = self.max_gap.max(now.saturating_duration_since(since));
            self.origin_since = (self.origin_jobs > 0).then_some(now);
        }
        let mut done = Vec::new();
        if ok {
            self.fetched.from_origin += bytes;
        }
        for &i in chunks {
            if i >= self.marks.state.len() {
                continue;
            }
            if ok || held(i) {
                if self.marks.state[i] != Tag::Done {
                    self.set(i, State::Done);
                    self.remaining -= 1;
                    done.push(i);
                }
                self.landed(now);
                continue;
            }
            let n = self.origin_tries.entry(i).or_default();
            *n += 1;
            if *n >= self.cfg.origin_tries {
                return Err(GiveUp { chunk: i });
            }
            if self.marks.state[i] != Tag::Done {
                self.set(i, State::Want);
            }
        }
        Ok(done)
    }
}

/// The pullers that still have origin reads to do: the owners (`owner_of_run`, given a run's
/// number) of runs with a chunk that is neither here, nor asked of a
/// peer, nor (`on_peer`) on any peer.
/// The chunks (a bitset of `words` words) that any of `views` holds: all of them if one
/// holds the whole version.
fn held_by<'a>(words: usize, views: impl Iterator<Item = &'a Entry>) -> Vec<u64> {
    let mut u = vec![0u64; words];
    for e in views {
        if e.info.holding == Holding::Complete {
            u.fill(u64::MAX);
            break;
        }
        if let Some(h) = &e.have {
            u.iter_mut().zip(&h.words).for_each(|(u, w)| *u |= w);
        }
    }
    u
}

/// The first bit set in `from..to` of bitset `set`.
fn next_bit(set: &[u64], from: usize, to: usize) -> Option<usize> {
    let mut at = from;
    while at < to {
        let bits = set[at / 64] >> (at % 64);
        if bits != 0 {
            let i = at + bits.trailing_zeros() as usize;
            return (i < to).then_some(i);
        }
        at = (at / 64 + 1) * 64;
    }
    None
}

/// Whether bit `i` of `set` is set.
fn bit(set: &[u64], i: usize) -> bool {
    set[i / 64] & (1 << (i % 64)) != 0
}

fn origin_readers<P: PeerKey>(
    layout: &Layout,
    state: &[Tag],
    on_peer: impl Fn(usize) -> bool,
    owner_of_run: impl Fn(usize) -> P,
) -> HashSet<P> {
    let mut owners = HashSet::default();
    for (k, chunks) in layout.run_chunks().enumerate() {
        let open = chunks
            .iter()
            .any(|&i| matches!(state[i], Tag::Want | Tag::Origin) && !on_peer(i));
        if open {
            owners.insert(owner_of_run(k));
        }
    }
    owners
}

#[cfg(test)]
mod tests;
