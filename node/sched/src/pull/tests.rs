//! Every decision of the pull scheduler, in virtual time.

use super::*;
use crate::{mix, owner_of};

const LEN: u32 = 40_000;

fn t(base: Instant, ms: u64) -> Instant {
    base + Duration::from_millis(ms)
}

/// Pullers as a content routing lists them, all started at once.
fn listed(members: &[(u64, u32)]) -> Vec<Puller<u32>> {
    members
        .iter()
        .map(|&(seed, id)| Puller {
            seed,
            id,
            started_ms: 0,
        })
        .collect()
}

/// A pull by node `me` of `n` chunks of [`LEN`] bytes, all missing, in pack order 0..n.
fn pull(me: u32, n: usize, now: Instant) -> Pull<u32> {
    pull_with(Config::default(), me, n, now)
}

fn pull_with(cfg: Config, me: u32, n: usize, now: Instant) -> Pull<u32> {
    let keys: Vec<u64> = (0..n as u64).map(mix).collect();
    let missing: Vec<usize> = (0..n).collect();
    let version = Chunks {
        lens: vec![LEN; n],
        keys,
        porder: (0..n).collect(),
        key: 7,
        tied: Vec::new(),
    };
    let layout = Arc::new(Layout::new(version, cfg.run));
    Pull::new(cfg, me, seed(me), layout, &missing, now)
}

fn seed(p: u32) -> u64 {
    mix(p as u64 ^ 0x5eed)
}

fn source(p: u32, holding: Holding, now: Instant) -> Source {
    Source {
        seed: seed(p),
        distance: 1,
        holding,
        rate: 1e9,
        rtt: 0.001,
        grew: now,
        faults: 0,
    }
}

/// Completes every origin read the pull asks for, starting with `pending`, polling at `now`
/// until it asks for none; returns the chunks read, in order.
fn drain_origin(p: &mut Pull<u32>, now: Instant, mut pending: Vec<Vec<usize>>) -> Vec<usize> {
    let mut read = Vec::new();
    while !pending.is_empty() {
        for c in pending {
            p.on_origin(now, &c, 0, true, |_| true).unwrap();
            read.extend(c);
        }
        pending = origin_reads(&p.poll(now));
    }
    read
}

/// A have-map that claims every one of `n` chunks.
fn claims_all(n: usize) -> HaveMap {
    let mut all = HaveMap::new(n);
    (0..n).for_each(|i| all.set(i));
    all
}

fn requests(actions: &[Action<u32>]) -> Vec<(u32, Vec<usize>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Request { peer, chunks, .. } => Some((*peer, chunks.clone())),
            _ => None,
        })
        .collect()
}

fn origin_reads(actions: &[Action<u32>]) -> Vec<Vec<usize>> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::ReadOrigin { chunks, .. } => Some(chunks.clone()),
            _ => None,
        })
        .collect()
}

/// Alone, a node reads every chunk from the origin once, in pack order, in batches of about
/// a run, at most `origin_parallel` at a time.
#[test]
fn alone_every_chunk_comes_from_the_origin_once_in_pack_order() {
    let t0 = Instant::now();
    let n = 2000;
    let mut p = pull(1, n, t0);
    let mut read = Vec::new();
    let mut pending: Vec<Vec<usize>> = Vec::new();
    let mut now = t0;
    while !p.is_done() {
        let a = p.poll(now);
        assert!(requests(&a).is_empty());
        for c in origin_reads(&a) {
            assert!(c.len() as u64 * LEN as u64 <= (1 << 20) + LEN as u64);
            pending.push(c);
        }
        assert!(
            pending.len() <= 16,
            "{} origin reads at once",
            pending.len()
        );
        // The oldest read completes.
        if !pending.is_empty() {
            let c = pending.remove(0);
            let done = p
                .on_origin(now, &c, c.len() as u64 * LEN as u64, true, |_| true)
                .unwrap();
            assert_eq!(done, c);
            read.extend(c);
        }
        now = t(now, 5);
    }
    assert_eq!(read, (0..n).collect::<Vec<_>>());
    assert_eq!(p.fetched().from_origin, n as u64 * LEN as u64);
    assert_eq!(p.poll_timeout(), None);
}

/// A peer holding the whole version serves every chunk; the origin serves none, and no more
/// than the window is ever in flight to the peer.
#[test]
fn a_complete_peer_serves_everything_within_its_window() {
    let t0 = Instant::now();
    let n = 3000;
    let mut p = pull(1, n, t0);
    p.set_connected(1);
    p.set_source(2, source(2, Holding::Complete, t0));
    let mut inflight: Vec<usize> = Vec::new();
    let mut now = t0;
    let mut asked = 0;
    while !p.is_done() {
        let a = p.poll(now);
        assert!(origin_reads(&a).is_empty(), "no origin read: {a:?}");
        for (peer, c) in requests(&a) {
            assert_eq!(peer, 2);
            assert!(c.len() as u64 * LEN as u64 <= (4 << 20) + LEN as u64);
            asked += c.len();
            inflight.extend(c);
        }
        assert!(inflight.len() as u64 * LEN as u64 <= (32 << 20) + LEN as u64);
        for i in inflight.drain(..inflight.len().min(200)) {
            assert_eq!(
                p.on_peer(now, 2, i, Outcome::Stored(LEN)),
                Delivery::Done(LEN)
            );
        }
        now = t(now, 10);
    }
    assert_eq!(asked, n, "each chunk asked once");
    assert_eq!(p.fetched().from_peers, n as u64 * LEN as u64);
}

/// Two pullers of a cold version split the origin reads by runs, each reading only the runs
/// rendezvous hashing gives it, and take the rest from each other once have-maps show it.
#[test]
fn co_pullers_split_the_origin_by_runs_and_swap_the_rest() {
    let t0 = Instant::now();
    let n = 32 * 40;
    let mut a = pull(1, n, t0);
    a.set_connected(1);
    // Fast enough that its window takes every chunk at once.
    let mut other = source(2, Holding::Pulling, t0);
    other.rate = 1e10;
    a.set_source(2, other);
    // Until the co-puller's have-map arrives, nothing is read (the settling period).
    let first = a.poll(t0);
    assert!(first.contains(&Action::QueryHave(2)));
    assert!(origin_reads(&first).is_empty());
    a.set_have(2, Some(HaveMap::new(n)), true);
    let pullers = [(seed(1), 1u32), (seed(2), 2u32)];
    let keys: Vec<u64> = (0..n as u64).map(mix).collect();
    let mine = |i: usize| owner_of(&pullers, keys[i - i % 32]) == 1;
    let mut now = t(t0, 1);
    let first = origin_reads(&a.poll(now));
    let read = drain_origin(&mut a, now, first);
    let expect: Vec<usize> = (0..n).filter(|&i| mine(i)).collect();
    assert!(!expect.is_empty() && expect.len() < n, "both own runs");
    assert_eq!(read, expect, "this node reads exactly its own runs");
    // The other's runs arrive in its have-map: asked of it, not of the origin.
    let mut h = HaveMap::new(n);
    for i in (0..n).filter(|&i| !mine(i)) {
        h.set(i);
    }
    a.set_have(2, Some(h), true);
    now = t(now, 300);
    let mut asked: Vec<usize> = requests(&a.poll(now))
        .into_iter()
        .flat_map(|(peer, c)| {
            assert_eq!(peer, 2);
            c
        })
        .collect();
    // (Each node scans from its own place: the order is this node's.)
    asked.sort();
    assert_eq!(asked, (0..n).filter(|&i| !mine(i)).collect::<Vec<_>>());
}

/// A request past its deadline, to a peer that has also sent nothing for a while, goes to
/// another source, and the late peer is reported as stalled.
#[test]
fn a_late_request_goes_to_another_source() {
    let t0 = Instant::now();
    let n = 10;
    let mut p = pull(1, n, t0);
    p.set_connected(2);
    let mut slow = source(2, Holding::Complete, t0);
    slow.rtt = 0.0; // the cheaper: asked first
    p.set_source(2, slow);
    p.set_source(3, source(3, Holding::Complete, t0));
    let first = requests(&p.poll(t0));
    assert_eq!(first, vec![(2, (0..n).collect())]);
    // Not late yet: nothing moves, and the scheduler says when to look again.
    let wake = p.poll_timeout().unwrap();
    assert!(wake > t0 && wake <= t(t0, 250));
    let a = p.poll(t(t0, 1500));
    assert!(requests(&a).is_empty(), "{a:?}");
    // Past the deadline (2 s slack): re-asked of the other peer.
    let a = p.poll(t(t0, 2100));
    assert!(a.contains(&Action::Stalled(2)), "{a:?}");
    assert_eq!(requests(&a), vec![(3, (0..n).collect())]);
    // The first good copy wins; the late one changes nothing.
    for i in 0..n {
        assert_eq!(
            p.on_peer(t(t0, 2200), 3, i, Outcome::Stored(LEN)),
            Delivery::Done(LEN)
        );
        assert_eq!(
            p.on_peer(t(t0, 2300), 2, i, Outcome::Stored(LEN)),
            Delivery::Nothing
        );
    }
    assert!(p.is_done());
}

/// A peer still sending (heard from within `quiet`) is not late, even past the deadline.
#[test]
fn a_peer_still_delivering_is_not_late() {
    let t0 = Instant::now();
    let mut p = pull(1, 4, t0);
    p.set_connected(2);
    p.set_source(2, source(2, Holding::Complete, t0));
    let mut far = source(3, Holding::Complete, t0);
    far.rtt = 1.0; // the dearer: nothing asked of it at first
    p.set_source(3, far);
    let asked = requests(&p.poll(t0));
    assert_eq!(asked.len(), 1);
    let (peer, chunks) = asked[0].clone();
    p.on_peer(t(t0, 2500), peer, chunks[0], Outcome::Stored(LEN));
    let a = p.poll(t(t0, 3000));
    assert!(requests(&a).is_empty() && !a.contains(&Action::Stalled(peer)));
    let a = p.poll(t(t0, 3600));
    assert!(a.contains(&Action::Stalled(peer)));
}

/// "Not here" for a chunk a fresh have-map advertised is reported (the driver counts it), the
/// bit is forgotten, and the chunk goes elsewhere; a puller with faults owns no origin runs,
/// so the rest of a lying puller's share is read by this node.
#[test]
fn a_lying_puller_is_reported_and_its_runs_taken_over() {
    let t0 = Instant::now();
    let n = 32 * 8;
    let mut p = pull(1, n, t0);
    p.set_connected(1);
    // Fast enough that its window takes every chunk at once.
    let mut claimer = source(2, Holding::Pulling, t0);
    claimer.rate = 1e10;
    p.set_source(2, claimer.clone());
    let all = claims_all(n);
    p.set_have(2, Some(all.clone()), true);
    let asked: Vec<usize> = requests(&p.poll(t0))
        .into_iter()
        .flat_map(|r| r.1)
        .collect();
    assert_eq!(
        asked.len(),
        n,
        "everything asked of the peer that claims it"
    );
    let mut missed = 0;
    for &i in &asked[..8] {
        if p.on_peer(t(t0, 5), 2, i, Outcome::Missing) == Delivery::Missed {
            missed += 1;
        }
    }
    assert_eq!(missed, 8);
    // The driver counted those as a fault; the liar still claims everything.
    let mut liar = claimer;
    liar.faults = 1;
    p.set_source(2, liar);
    p.set_have(2, Some(all), true);
    // The chunks it denied: from the origin, by this node, now the only trusted puller.
    let a = p.poll(t(t0, 300));
    let read: Vec<usize> = origin_reads(&a).into_iter().flatten().collect();
    let mut denied = asked[..8].to_vec();
    denied.sort_by_key(|&i| i); // origin reads go in pack order
    assert_eq!(read, denied);
    // A stale map (from before a reconnection) is used, but its misses are not reported.
    let mut q = pull(1, n, t0);
    q.set_connected(1);
    q.set_source(2, source(2, Holding::Pulling, t0));
    let mut some = HaveMap::new(n);
    some.set(0);
    q.set_have(2, Some(some), false);
    assert_eq!(requests(&q.poll(t0)), vec![(2, vec![0])]);
    assert_eq!(q.on_peer(t0, 2, 0, Outcome::Missing), Delivery::Nothing);
}

/// A co-puller that delivers nothing is waited for one quiet spell (`stuck`: nothing has
/// landed here for that long), then its runs are read here.
#[test]
fn an_idle_puller_loses_its_runs() {
    let t0 = Instant::now();
    let n = 32 * 20;
    let mut p = pull(1, n, t0);
    p.set_connected(1);
    p.set_source(2, source(2, Holding::Pulling, t0));
    p.set_have(2, Some(HaveMap::new(n)), true);
    let drain = |p: &mut Pull<u32>, now: Instant| {
        let first = origin_reads(&p.poll(now));
        drain_origin(p, now, first)
    };
    let early = drain(&mut p, t(t0, 1000));
    assert!(!early.is_empty() && early.len() < n);
    assert!(drain(&mut p, t(t0, 5_900)).is_empty(), "still waited for");
    let late = drain(&mut p, t(t0, 6_100));
    assert_eq!(
        early.len() + late.len(),
        n,
        "the idle puller's runs read here"
    );
    assert!(p.is_done());
}

/// A failed origin read keeps what landed and retries the rest; a chunk that fails
/// `origin_tries` times fails the pull.
#[test]
fn origin_failures_are_retried_then_give_up() {
    let t0 = Instant::now();
    let n = 4;
    let mut p = pull(1, n, t0);
    let c = origin_reads(&p.poll(t0)).remove(0);
    assert_eq!(c, vec![0, 1, 2, 3]);
    // Chunks 0 and 1 landed before the failure.
    let done = p.on_origin(t0, &c, 0, false, |i| i < 2).unwrap();
    assert_eq!(done, vec![0, 1]);
    let again = origin_reads(&p.poll(t(t0, 1))).remove(0);
    assert_eq!(again, vec![2, 3]);
    p.on_origin(t(t0, 1), &again, 0, false, |_| false).unwrap();
    let again = origin_reads(&p.poll(t(t0, 2))).remove(0);
    assert_eq!(
        p.on_origin(t(t0, 2), &again, 0, false, |_| false),
        Err(GiveUp { chunk: 2 })
    );
}

/// A lost request (connection gone) frees the peer's window and the chunks go elsewhere.
#[test]
fn lost_requests_go_elsewhere() {
    let t0 = Instant::now();
    let mut p = pull(1, 3, t0);
    p.set_connected(1);
    p.set_source(2, source(2, Holding::Complete, t0));
    let (_, chunks) = requests(&p.poll(t0)).remove(0);
    for &i in &chunks {
        assert_eq!(p.on_peer(t0, 2, i, Outcome::Lost), Delivery::Nothing);
    }
    p.remove_source(&2);
    p.set_connected(0);
    let a = p.poll(t(t0, 1));
    assert_eq!(origin_reads(&a), vec![vec![0, 1, 2]]);
    // Bad bytes: the chunk is not asked of that peer again.
    let mut q = pull(1, 1, t0);
    q.set_connected(2);
    q.set_source(2, source(2, Holding::Complete, t0));
    q.set_source(3, source(3, Holding::Complete, t0));
    let (first, _) = requests(&q.poll(t0)).remove(0);
    q.on_peer(t0, first, 0, Outcome::Bad);
    let (second, _) = requests(&q.poll(t(t0, 1))).remove(0);
    assert_ne!(first, second);
}

/// Nearer peers first: a same-zone peer is asked before a faster one farther away.
#[test]
fn locality_comes_before_speed() {
    let t0 = Instant::now();
    let mut p = pull(1, 50, t0);
    p.set_connected(2);
    let mut near = source(2, Holding::Complete, t0);
    near.rate = 1e8;
    let mut far = source(3, Holding::Complete, t0);
    far.distance = 3;
    far.rate = 1e10;
    p.set_source(2, near);
    p.set_source(3, far);
    let asked = requests(&p.poll(t0));
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].0, 2);
}

/// A peer that advertises every chunk and never answers: once its requests are late it is
/// counted on for nothing (not as a source, not as an origin reader) until it answers, so what
/// only it claims is read from the origin instead of waiting for it forever. (Found by the
/// simulator: a cluster with one such peer never finished.)
#[test]
fn a_silent_peer_is_counted_on_for_nothing_until_it_answers() {
    let t0 = Instant::now();
    let n = 32 * 4;
    let mut p = pull(1, n, t0);
    p.set_connected(1);
    p.set_source(2, source(2, Holding::Pulling, t0));
    let all = claims_all(n);
    p.set_have(2, Some(all), true);
    let asked: Vec<usize> = requests(&p.poll(t0))
        .into_iter()
        .flat_map(|r| r.1)
        .collect();
    assert_eq!(asked.len(), n);
    // Nothing comes back. Past the deadline: every chunk from the origin, by this node.
    let now = t(t0, 2500);
    let a = p.poll(now);
    assert!(a.contains(&Action::Stalled(2)), "{a:?}");
    let read = drain_origin(&mut p, now, origin_reads(&a));
    assert!(p.is_done(), "{} chunks read from the origin", read.len());
    assert_eq!(read.len(), n);
    // Once it answers again it is a source again.
    let mut q = pull(1, 4, t0);
    q.set_connected(1);
    q.set_source(2, source(2, Holding::Complete, t0));
    let (_, c) = requests(&q.poll(t0)).remove(0);
    assert!(q.poll(t(t0, 2500)).contains(&Action::Stalled(2)));
    // (Re-asked of nobody: the only source is silent; the origin gets them.)
    q.on_peer(t(t0, 2600), 2, c[0], Outcome::Stored(LEN));
    assert_eq!(q.remaining(), 3);
}

/// Of many pullers only the first [`Config::origin_readers`] by rendezvous on the version
/// read from the origin, whoever this node is connected to; the others wait for the swarm.
#[test]
fn only_the_chosen_readers_read_from_the_origin() {
    let t0 = Instant::now();
    // Enough runs that every reader owns some.
    let n = 32 * 400;
    let readers = Config::default().origin_readers;
    let members: Vec<(u64, u32)> = (1..=readers as u32 + 12).map(|p| (seed(p), p)).collect();
    let mut ranked = members.clone();
    ranked.sort_by_key(|(s, p)| (std::cmp::Reverse(mix(s ^ 7)), *p));
    let chosen: Vec<u32> = ranked[..readers].iter().map(|m| m.1).collect();
    for &(_, me) in &members {
        let mut p = pull(me, n, t0);
        p.set_pullers(Some(listed(&members)));
        let read = origin_reads(&p.poll(t0)).concat();
        assert_eq!(
            !read.is_empty(),
            chosen.contains(&me),
            "node {me}: chosen readers {chosen:?}"
        );
    }
}

/// Readers in the order they started, and the origin taken to give them 2 GB/s.
fn paced() -> Config {
    Config {
        readers_in_order: true,
        origin_pace: 2_000_000_000,
        ..Config::default()
    }
}

/// Pullers (id, when it started, in ms), in that order.
fn started(members: &[(u32, u64)]) -> Vec<Puller<u32>> {
    members
        .iter()
        .map(|&(id, started_ms)| Puller {
            seed: seed(id),
            id,
            started_ms,
        })
        .collect()
}

/// Readers taken in the order they started: one that started later owns no run before what
/// the origin could have given the readers since (`Config::origin_pace`), so it never takes
/// over a run an earlier reader may have read; after that point the runs are shared as ever.
/// Started together, they share every run.
#[test]
fn a_later_reader_owns_only_runs_the_origin_cannot_have_given_yet() {
    let t0 = Instant::now();
    // 512 MB in runs of 1.28 MB.
    let n = 32 * 400;
    let cfg = paced();
    let reads = |gap_ms: u64| {
        let members = started(&[(1, 1_000), (2, 1_000 + gap_ms)]);
        let mut read = Vec::new();
        for me in [1, 2] {
            let mut p = pull_with(cfg.clone(), me, n, t0);
            p.set_pullers(Some(members.clone()));
            let first = origin_reads(&p.poll(t0));
            let mut mine = drain_origin(&mut p, t0, first);
            mine.sort();
            read.push(mine);
        }
        assert_eq!(read[0].len() + read[1].len(), n, "every chunk once");
        read
    };
    // 50 ms later at 2 GB/s: nothing of the first 100 MB.
    let later = reads(50);
    let from = (100_000_000 / LEN as usize).div_ceil(32) * 32;
    let first_of = |r: &[Vec<usize>]| r[1][0];
    assert!(
        (from..from + 32 * 8).contains(&first_of(&later)),
        "the newcomer's first chunk: {} (from {from})",
        first_of(&later)
    );
    assert!(later[0][..from].iter().copied().eq(0..from));
    let after = |r: &[usize]| r.iter().filter(|&&i| i >= from).count() as f64;
    let share = after(&later[1]) / (n - from) as f64;
    assert!((0.35..0.65).contains(&share), "shares the rest: {share}");
    // 10 s later, far past the version at that pace: the first owns a quarter alone
    // (`PACE_LEAD`), no more.
    let much_later = reads(10_000);
    let quarter = (n * LEN as usize / PACE_LEAD as usize / LEN as usize).div_ceil(32) * 32;
    assert!(
        (quarter..quarter + 32 * 8).contains(&first_of(&much_later)),
        "the newcomer's first chunk: {} (a quarter: {quarter})",
        first_of(&much_later)
    );
    assert!(much_later[0][..quarter].iter().copied().eq(0..quarter));
    // Together: the runs are shared from the start.
    let together = reads(0);
    assert!(together[1][0] < 32 * 8, "{:?}", &together[1][..4]);
}

/// Three readers listed; the owner of each of 8 runs of 32 among them less `without` (0:
/// none).
fn three_readers() -> (Vec<(u64, u32)>, impl Fn(u32, usize) -> u32) {
    let members: Vec<(u64, u32)> = (1..=3u32).map(|p| (seed(p), p)).collect();
    let all = members.clone();
    let owner = move |without: u32, run: usize| {
        let rest: Vec<(u64, u32)> = all.iter().copied().filter(|m| m.1 != without).collect();
        owner_of(&rest, mix(run as u64 * 32))
    };
    (members, owner)
}

/// Node `me` of [`three_readers`] pulls 8 runs next to one peer (9) that got the first chunk
/// of each other owner's first run (so those owners showed they read); its own runs and the
/// peer's chunks land at 10 ms, and nothing more arrives. Returns the pull and the chunks
/// the peer had.
fn beside_quiet_owners(me: u32, t0: Instant) -> (Pull<u32>, Vec<usize>) {
    let n = 32 * 8;
    let (members, owner) = three_readers();
    let mut p = pull(me, n, t0);
    p.set_pullers(Some(listed(&members)));
    let shown: Vec<usize> = [1u32, 2, 3]
        .iter()
        .filter(|&&m| m != me)
        .map(|&m| (0..8).find(|&r| owner(0, r) == m).expect("owns a run") * 32)
        .collect();
    let mut map = HaveMap::new(n);
    shown.iter().for_each(|&i| map.set(i));
    p.set_source(9, source(9, Holding::Pulling, t0));
    p.set_have(9, Some(map), true);
    let acts = p.poll(t0);
    for (peer, chunks) in requests(&acts) {
        for i in chunks {
            p.on_peer(t(t0, 10), peer, i, Outcome::Stored(LEN));
        }
    }
    let mine = drain_origin(&mut p, t(t0, 10), origin_reads(&acts));
    assert!(mine.iter().all(|&i| owner(0, i / 32) == me));
    (p, shown)
}

/// The runs the chunks `read` are in.
fn runs_read(read: &[usize]) -> std::collections::BTreeSet<usize> {
    read.iter().map(|i| i / 32).collect()
}

/// Once nothing has landed for the stuck threshold, the runs of an owner nobody hears from
/// go to the next reader in line, not to every node that waits.
#[test]
fn a_silent_owners_runs_go_to_the_next_in_line() {
    let t0 = Instant::now();
    let (_, owner) = three_readers();
    // After one quiet spell each node reads the runs of each other owner for which it is
    // next in line, and no others.
    for me in [1u32, 2, 3] {
        let (mut p, shown) = beside_quiet_owners(me, t0);
        let spell = Config::default().stuck;
        let quiet = t0 + spell - Duration::from_millis(20);
        assert!(origin_reads(&p.poll(quiet)).is_empty(), "waits one spell");
        let at = t0 + spell + Duration::from_millis(20);
        let first = origin_reads(&p.poll(at));
        let taken = drain_origin(&mut p, at, first);
        assert!(taken.iter().all(|i| !shown.contains(i)));
        let expect: std::collections::BTreeSet<usize> = (0..8)
            .filter(|&r| owner(0, r) != me && owner(owner(0, r), r) == me)
            .collect();
        assert!(!expect.is_empty() || me == 3);
        assert_eq!(
            runs_read(&taken),
            expect,
            "node {me} takes exactly the runs it is next in line for"
        );
    }
}

/// A pause that ended with another node's takeover (about a quiet spell) is no measure of the
/// swarm's pace: the next spell is not stretched by it. And a stall after a stall goes further
/// down the line at once: the runs this node is second in line for are its own after one
/// more spell, not two (staggered pulls with liars among the readers took 17-31 s, each
/// spell longer than the last).
#[test]
fn a_stall_after_a_stall_is_neither_stretched_nor_waited_out_again() {
    let t0 = Instant::now();
    let (_, owner) = three_readers();
    let spell = Config::default().stuck;
    let ms = Duration::from_millis;
    for me in [1u32, 2, 3] {
        let (mut p, _) = beside_quiet_owners(me, t0);
        let theirs: Vec<usize> = (0..8).filter(|&r| owner(0, r) != me).collect();
        // Just before a spell passes, the peer gains a chunk of another's run (another node's
        // takeover) and it lands: a pause of nearly a spell, not learnt.
        let other = theirs[0] * 32 + 1;
        let late = t0 + spell - ms(100);
        p.on_have(9, &[other]);
        for (peer, chunks) in requests(&p.poll(late)) {
            for i in chunks {
                p.on_peer(late, peer, i, Outcome::Stored(LEN));
            }
        }
        // One spell after that landing: the runs it is next in line for.
        let at = late + spell + ms(20);
        let reads = origin_reads(&p.poll(at));
        let first = drain_origin(&mut p, at, reads);
        let next: std::collections::BTreeSet<usize> = theirs
            .iter()
            .copied()
            .filter(|&r| owner(owner(0, r), r) == me)
            .collect();
        assert_eq!(runs_read(&first), next, "node {me}: one spell, not four");
        // One more spell: the rest of the others' runs, second in line as it is.
        let rest: std::collections::BTreeSet<usize> = theirs
            .iter()
            .copied()
            .filter(|r| !next.contains(r))
            .collect();
        let before = at + spell - ms(20);
        assert!(origin_reads(&p.poll(before)).is_empty(), "waits a spell");
        let again = at + spell + ms(20);
        let reads = origin_reads(&p.poll(again));
        let second = drain_origin(&mut p, again, reads);
        assert_eq!(
            runs_read(&second),
            rest,
            "node {me}: one more spell, not two"
        );
        assert!(p.is_done(), "node {me}");
    }
}

/// A reader out of view taken for alive through others' maps (nodes that saw it lie read
/// some of its runs in its place) whose share stays mostly unread while the other readers'
/// is read is passed over after `reader_lag`, and this node reads the runs it is next in
/// line for, not a quiet spell later (64 nodes with six liars: 16 s; 1,000 with ten and
/// churn: 20-36 s).
#[test]
fn a_reader_whose_share_stays_unread_while_the_others_is_read_is_passed_over() {
    let t0 = Instant::now();
    let runs = 64;
    let n = 32 * runs;
    let members: Vec<(u64, u32)> = (1..=4u32).map(|p| (seed(p), p)).collect();
    let mut all = members.clone();
    all.push((seed(5), 5));
    let owner = |pullers: &[(u64, u32)], run: usize| owner_of(pullers, mix(run as u64 * 32));
    let without_4: Vec<(u64, u32)> = all.iter().copied().filter(|m| m.1 != 4).collect();
    let fours: Vec<usize> = (0..runs).filter(|&r| owner(&all, r) == 4).collect();
    assert!(fours.len() >= 6, "{fours:?}");
    // A co-puller in view holds every run of readers 1 to 3 and a third of reader 4's.
    let shown = fours.len() / 3;
    let mut map = HaveMap::new(n);
    let theirs = (0..runs).filter(|&r| matches!(owner(&all, r), 1..=3));
    for r in theirs.chain(fours[..shown].iter().copied()) {
        (r * 32..(r + 1) * 32).for_each(|i| map.set(i));
    }
    let mut p = pull(5, n, t0);
    p.set_pullers(Some(listed(&members)));
    p.set_source(9, source(9, Holding::Pulling, t0));
    p.set_have(9, Some(map), true);
    // Whatever is asked lands at once, for three seconds.
    let mut read: Vec<(Instant, usize)> = Vec::new();
    let mut now = t0;
    while now < t0 + Duration::from_secs(3) {
        loop {
            let acts = p.poll(now);
            let (asked, reads) = (requests(&acts), origin_reads(&acts));
            if asked.is_empty() && reads.is_empty() {
                break;
            }
            for (peer, chunks) in asked {
                for i in chunks {
                    p.on_peer(now, peer, i, Outcome::Stored(LEN));
                }
            }
            for c in reads {
                p.on_origin(now, &c, 0, true, |_| true).unwrap();
                read.extend(c.into_iter().map(|i| (now, i)));
            }
        }
        now += Duration::from_millis(50);
    }
    let lag = Config::default().reader_lag;
    let instead: std::collections::BTreeSet<usize> = fours[shown..]
        .iter()
        .copied()
        .filter(|&r| owner(&without_4, r) == 5)
        .collect();
    assert!(!instead.is_empty());
    let of_4: Vec<(Instant, usize)> = read
        .iter()
        .copied()
        .filter(|(_, i)| owner(&all, i / 32) == 4)
        .collect();
    assert!(
        of_4.iter().all(|(at, _)| *at >= t0 + lag),
        "passed over only after reader_lag"
    );
    let runs_4: Vec<usize> = of_4.iter().map(|(_, i)| *i).collect();
    assert_eq!(
        runs_read(&runs_4),
        instead,
        "the runs it is next in line for"
    );
    assert_eq!(p.fetched().readers_passed_over_by_lag, 1);
}

/// Readers that do not exist (listed by a hostile member, ranked first) show no sign of
/// life to anyone: a quiet spell after they were chosen, every node leaves them out before
/// choosing, the next by rank read in their place, and the runs are shared among them as
/// every node agrees (not read by every node that waits).
#[test]
fn readers_that_show_no_sign_of_life_are_replaced_by_the_next_by_rank() {
    let t0 = Instant::now();
    let n = 32 * 400;
    let readers = Config::default().origin_readers;
    // Members 1..=readers + 12 are real; as many phantoms (1000..) are chosen to rank first.
    let real: Vec<(u64, u32)> = (1..=readers as u32 + 12).map(|p| (seed(p), p)).collect();
    let rank = |m: &(u64, u32)| mix(m.0 ^ 7);
    let floor = real.iter().map(rank).max().unwrap();
    let phantoms: Vec<(u64, u32)> = (1000..1_000_000u32)
        .map(|p| (seed(p), p))
        .filter(|m| rank(m) > floor)
        .take(readers)
        .collect();
    assert_eq!(phantoms.len(), readers);
    let members: Vec<(u64, u32)> = real.iter().chain(&phantoms).copied().collect();
    let mut ranked = real.clone();
    ranked.sort_by_key(|m| std::cmp::Reverse(rank(m)));
    let next: Vec<(u64, u32)> = ranked[..readers].to_vec();
    let spell = Config::default().stuck;
    let mut read_by: HashMap<usize, u32> = HashMap::default();
    for &(_, me) in &real {
        let mut p = pull(me, n, t0);
        p.set_pullers(Some(listed(&members)));
        assert!(
            origin_reads(&p.poll(t0)).is_empty(),
            "node {me}: the phantoms are the readers at first"
        );
        let quiet = t0 + spell - Duration::from_millis(20);
        p.set_pullers(Some(listed(&members)));
        assert!(
            origin_reads(&p.poll(quiet)).is_empty(),
            "node {me} waits a spell"
        );
        let at = t0 + spell + Duration::from_millis(20);
        p.set_pullers(Some(listed(&members)));
        let first = origin_reads(&p.poll(at));
        let read = drain_origin(&mut p, at, first);
        assert_eq!(
            !read.is_empty(),
            next.iter().any(|m| m.1 == me),
            "node {me}: the next {readers} by rank read"
        );
        for i in read {
            assert!(
                read_by.insert(i, me).is_none(),
                "chunk {i} read by {me} and {:?}",
                read_by.get(&i)
            );
            assert_eq!(owner_of(&next, mix(i as u64 / 32 * 32)), me);
        }
    }
    // Every chunk read once, by its owner among the next readers.
    assert_eq!(read_by.len(), n);
}

/// The first reader to start owns what the origin could give before the others started, up
/// to a quarter of the version (`PACE_LEAD`), and when nodes see it fail (a fault) its runs
/// are shared by the rest by rendezvous: between them they read every run once.
#[test]
fn a_failing_first_readers_runs_are_shared_by_the_rest() {
    let t0 = Instant::now();
    // 512 MB; readers 2 and 3 start 10 s after 1, far past the version at 2 GB/s.
    let n = 32 * 400;
    let cfg = paced();
    let members = started(&[(1, 1_000), (2, 11_000), (3, 11_000)]);
    let runs = |read: &[usize]| {
        let mut r: Vec<usize> = read.iter().map(|i| i / 32).collect();
        r.dedup();
        r
    };
    // Reader 2 with 1 well: it owns nothing of the first quarter (`PACE_LEAD`), some after.
    let mut p = pull_with(cfg.clone(), 2, n, t0);
    p.set_pullers(Some(members.clone()));
    let first = origin_reads(&p.poll(t0));
    let well = runs(&drain_origin(&mut p, t0, first));
    assert!(well.iter().all(|&k| k >= 100), "{:?}", &well[..4]);
    assert!(!well.is_empty());
    // Reader 1 failing at 2 and 3 (a fault): each reads some of its runs, and every run is
    // read once.
    let mut read = Vec::new();
    for me in [2, 3] {
        let mut p = pull_with(cfg.clone(), me, n, t0);
        p.set_pullers(Some(members.clone()));
        let mut one = source(1, Holding::Pulling, t0);
        one.faults = 1;
        p.set_source(1, one);
        let first = origin_reads(&p.poll(t0));
        read.push(runs(&drain_origin(&mut p, t0, first)));
    }
    let head = |r: &[usize]| r.iter().filter(|&&k| k < 100).count();
    let heads = [head(&read[0]), head(&read[1])];
    assert!(
        heads.iter().all(|&h| (30..70).contains(&h)),
        "the first quarter's runs: {heads:?}"
    );
    let mut all: Vec<usize> = read.concat();
    all.sort();
    assert!(all.iter().copied().eq(0..400), "every run once");
}

/// Seen through the others, a run of a reader's is its sign of life only while nobody can
/// have read it in its place (a node whose pull began earlier may have passed it over by
/// then, and its reads would pass for the reader's own); after that only the runs this node
/// would read in its place count.
#[test]
fn a_readers_runs_read_by_others_in_its_place_are_not_its_sign_of_life() {
    let t0 = Instant::now();
    let n = 32 * 400;
    let cfg = Config {
        origin_readers: 4,
        ..Config::default()
    };
    let ranked = next_in_line(cfg.clone(), n, t0).1;
    let readers = &ranked[..4];
    let (quiet, me) = (readers[3].1, ranked[4].1);
    let key = |i: usize| mix(i as u64 / 32 * 32);
    let run_of_quiet = |i: usize| owner_of(readers, key(i)) == quiet;
    // Who would read each of the quiet reader's runs in its place: the next by rank.
    let mut rest = readers[..3].to_vec();
    rest.push((seed(me), me));
    let mine_in_its_place = |i: usize| owner_of(&rest, key(i)) == me;
    let others_run = (0..n)
        .find(|&i| run_of_quiet(i) && !mine_in_its_place(i))
        .expect("a run another would read");
    let my_run = (0..n)
        .find(|&i| run_of_quiet(i) && mine_in_its_place(i))
        .expect("a run this node would read");
    let reads_at_1100 = |shows: usize| {
        let mut p = next_in_line(cfg.clone(), n, t0).0;
        // The three others showed life at once; 950 ms in (past the 900 ms after which the
        // quiet one's runs may have been read in its place), one chunk of its shows.
        p.on_have(50, &[shows]);
        assert!(origin_reads(&p.poll(t(t0, 950))).is_empty());
        origin_reads(&p.poll(t(t0, 1_100)))
    };
    assert!(
        !reads_at_1100(others_run).is_empty(),
        "a run another may have read taken for its sign of life"
    );
    assert!(
        reads_at_1100(my_run).is_empty(),
        "a run only it would read not taken for its sign of life"
    );
}

/// A roster full of pullers that started earlier (the most it lists) leaves out those that
/// started later: a node unlisted there is not a reader while listed ones live (others it
/// cannot see may have started before it, each taking itself for the next reader), and once
/// every listed one is dead it shares the runs with the pullers in view. With room in the
/// roster, an unlisted node is only not listed yet, and reads.
#[test]
fn a_node_left_out_of_a_full_roster_reads_only_once_every_listed_reader_is_dead() {
    let t0 = Instant::now();
    let n = 32 * 400;
    let cfg = paced();
    let full = cfg.origin_readers + SPARE_READERS;
    let ids: Vec<u32> = (100..100 + full as u32).collect();
    let listed: Vec<(u32, u64)> = ids.iter().map(|&p| (p, 1)).collect();
    let readers: Vec<(u64, u32)> = ids[..cfg.origin_readers]
        .iter()
        .map(|&p| (seed(p), p))
        .collect();
    // A co-puller in view holds the runs of the first listed reader: it shows life, the
    // other readers none; a quiet spell later they are dead and the spares are readers.
    let mut map = HaveMap::new(n);
    (0..n)
        .filter(|&i| owner_of(&readers, mix(i as u64 / 32 * 32)) == ids[0])
        .for_each(|i| map.set(i));
    let mut p = pull_with(cfg.clone(), 1, n, t0);
    p.set_pullers(Some(started(&listed)));
    p.set_source(2, source(2, Holding::Pulling, t0));
    p.set_have(2, Some(map), true);
    assert!(origin_reads(&p.poll(t0)).is_empty());
    assert!(
        origin_reads(&p.poll(t(t0, 6_000))).is_empty(),
        "read while listed ones live"
    );
    // Every listed puller dead (the spares a spell after they were chosen): this node and the
    // puller in view share the runs.
    let mut p = pull_with(cfg.clone(), 1, n, t0);
    p.set_pullers(Some(started(&listed)));
    p.set_source(2, source(2, Holding::Pulling, t0));
    for ms in [0, 6_000, 10_000] {
        assert!(
            origin_reads(&p.poll(t(t0, ms))).is_empty(),
            "read at {ms} ms"
        );
    }
    let first = origin_reads(&p.poll(t(t0, 12_000)));
    let share = runs_of(&drain_origin(&mut p, t(t0, 12_000), first)) as f64 / 400.0;
    assert!((0.3..0.7).contains(&share), "reads {share} of the runs");
    // With room: one listed puller that lives, and this node next.
    let mut p = pull_with(cfg, 1, n, t0);
    p.set_pullers(Some(started(&listed[..1])));
    let first = origin_reads(&p.poll(t0));
    let share = runs_of(&drain_origin(&mut p, t0, first)) as f64 / 400.0;
    assert!((0.3..0.7).contains(&share), "reads {share} of the runs");
}

fn runs_of(read: &[usize]) -> usize {
    let mut r: Vec<usize> = read.iter().map(|i| i / 32).collect();
    r.dedup();
    r.len()
}

/// Six pullers listed together, four of them readers by rank; this node the fifth (the next
/// in line) and a co-puller (50) in view holding every run of the first three readers from the
/// start (they show life at once). The pull, polled once (not a reader), and the readers.
fn next_in_line(cfg: Config, n: usize, t0: Instant) -> (Pull<u32>, Vec<(u64, u32)>) {
    let members: Vec<(u64, u32)> = (1..=6u32).map(|p| (seed(p), p)).collect();
    let mut ranked = members.clone();
    ranked.sort_by_key(|(s, p)| (std::cmp::Reverse(mix(s ^ 7)), *p));
    let readers = ranked[..4].to_vec();
    let last = readers[3].1;
    let mut map = HaveMap::new(n);
    (0..n)
        .filter(|&i| owner_of(&readers, mix(i as u64 / 32 * 32)) != last)
        .for_each(|i| map.set(i));
    let mut p = pull_with(cfg, ranked[4].1, n, t0);
    p.set_pullers(Some(listed(&members)));
    p.set_source(50, source(50, Holding::Pulling, t0));
    p.set_have(50, Some(map), true);
    assert!(origin_reads(&p.poll(t0)).is_empty(), "not a reader");
    (p, ranked[..5].to_vec())
}

/// Readers chosen together show life within a poll or two of each other; one that has not
/// after four times the others' median (at least `reader_lag`) is dead long before a quiet
/// spell, and the next in line reads its runs.
#[test]
fn a_reader_far_behind_the_others_is_passed_over_in_about_a_second() {
    let t0 = Instant::now();
    let n = 32 * 400;
    let cfg = Config {
        origin_readers: 4,
        reader_lag: Duration::from_secs(1),
        ..Config::default()
    };
    let (mut p, ranked) = next_in_line(cfg, n, t0);
    let readers = &ranked[..4];
    let liar = readers[3].1;
    let run_of_liar = |i: usize| owner_of(readers, mix(i as u64 / 32 * 32)) == liar;
    // The three showed life at once (a median of 0): the liar has the least, 1 s.
    assert!(origin_reads(&p.poll(t(t0, 300))).is_empty());
    assert!(origin_reads(&p.poll(t(t0, 900))).is_empty(), "too soon");
    let first = origin_reads(&p.poll(t(t0, 1_100)));
    let read = drain_origin(&mut p, t(t0, 1_100), first);
    assert!(
        !read.is_empty(),
        "the next in line reads in the liar's place"
    );
    assert!(
        read.iter().all(|&i| run_of_liar(i)),
        "only what nobody holds"
    );
}

/// A reader whose runs show at a peer only in the last `settle` of its quiet spell is not
/// taken for alive: nodes that chose it a little earlier have judged it dead by then and read
/// its runs, and their reads would pass for its own. It is dead at the spell's end, and the
/// next in line reads what nobody holds.
#[test]
fn a_readers_runs_showing_only_as_its_spell_ends_are_not_a_sign_of_life() {
    let t0 = Instant::now();
    let n = 32 * 400;
    let cfg = Config {
        origin_readers: 4,
        reader_lag: Duration::MAX,
        ..Config::default()
    };
    let (mut p, ranked) = next_in_line(cfg, n, t0);
    let readers = &ranked[..4];
    let quiet = readers[3].1;
    let run_of_quiet = |i: usize| owner_of(readers, mix(i as u64 / 32 * 32)) == quiet;
    // 4.5 s in (the spell is 5 s), one chunk of the quiet reader's runs shows at the peer.
    let one = (0..n).find(|&i| run_of_quiet(i)).expect("a run of its own");
    p.on_have(50, &[one]);
    assert!(origin_reads(&p.poll(t(t0, 4_500))).is_empty(), "too soon");
    let first = origin_reads(&p.poll(t(t0, 5_100)));
    let read = drain_origin(&mut p, t(t0, 5_100), first);
    assert!(!read.is_empty(), "the late sign taken for life");
    // (Chunks asked of the peer 5 s ago and never sent are late by now: this node, a reader
    // now, may read some of those too.)
    assert!(
        read.iter().any(|&i| run_of_quiet(i)),
        "none of the quiet reader's runs"
    );
    assert!(!read.contains(&one), "read what the peer holds");
}

/// What is in flight to a peer follows the rate measured from it: the least window until it
/// is measured, about `window_time` of its rate after, and never more than `peer_window`.
#[test]
fn a_peers_window_follows_its_measured_rate() {
    let t0 = Instant::now();
    let n = 32 * 40; // 51 MB
    let cfg = Config::default();
    let in_flight = |rate: f64| -> u64 {
        let mut p = pull(1, n, t0);
        p.set_connected(1);
        let mut s = source(2, Holding::Complete, t0);
        s.rate = rate;
        p.set_source(2, s);
        requests(&p.poll(t0))
            .iter()
            .map(|(_, c)| c.len() as u64 * LEN as u64)
            .sum()
    };
    // A window is filled up to its size and at most one chunk past it.
    let fits = |bytes: u64, window: u64| bytes >= window && bytes < window + LEN as u64;
    assert!(fits(in_flight(0.0), cfg.peer_window_min), "unmeasured");
    let rate = 5e8; // 5 MB in 10 ms
    let window = (rate * cfg.window_time.as_secs_f64()) as u64;
    assert!(window > cfg.peer_window_min && window < cfg.peer_window);
    assert!(fits(in_flight(rate), window), "{}", in_flight(rate));
    assert!(fits(in_flight(1e11), cfg.peer_window), "capped");
}

/// Co-pullers start their scans at different places (by seed), so that they soon hold
/// different chunks to trade.
#[test]
fn co_pullers_ask_for_different_chunks_first() {
    let t0 = Instant::now();
    let n = 32 * 40;
    let first = |me: u32| -> usize {
        let mut p = pull(me, n, t0);
        p.set_connected(1);
        p.set_source(9, source(9, Holding::Complete, t0));
        requests(&p.poll(t0))[0].1[0]
    };
    let starts: HashSet<usize> = (1..=8).map(first).collect();
    assert!(starts.len() >= 6, "{starts:?}");
}

#[test]
fn tied_chunks_share_a_run_and_runs_stay_near_their_size() {
    // Chunks 0-99 in pack order 99..0; every chunk 5k+1..5k+4 tied to the one before (frames
    // of five chunks), but chunks 40..=79 all one frame.
    let n = 100;
    let porder: Vec<usize> = (0..n).rev().collect();
    let tied: Vec<bool> = (0..n)
        .map(|pos| pos % 5 != 0 || (41..80).contains(&pos))
        .collect();
    let version = Chunks {
        lens: vec![LEN; n],
        keys: (0..n as u64).map(mix).collect(),
        porder: porder.clone(),
        key: 7,
        tied: tied.clone(),
    };
    let layout = Layout::new(version, 8);
    let runs: Vec<&[usize]> = layout.run_chunks().collect();
    assert_eq!(runs.iter().map(|r| r.len()).sum::<usize>(), n);
    for pos in 1..n {
        let (a, b) = (porder[pos - 1], porder[pos]);
        if tied[pos] {
            assert_eq!(layout.run_of[a], layout.run_of[b], "tied at {pos}");
        }
    }
    // Runs of 8 rounded up to the frame (10), and the 40-chunk frame one run.
    let lens: Vec<usize> = runs.iter().map(|r| r.len()).collect();
    assert_eq!(lens, vec![10, 10, 10, 10, 40, 10, 10]);
    assert_eq!(layout.runs(), 7);
}
