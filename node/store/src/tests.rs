//! The store contract, run at and around the capacity thresholds.

use super::*;
use std::os::unix::fs::FileExt;

fn blob(seed: u32, len: usize) -> (Hash, Vec<u8>) {
    let mut b = vec![0u8; len];
    let mut x = seed as u64 * 0x9E37_79B9 + 1;
    for v in b.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *v = x as u8;
    }
    (shoal_chunker::hash(&b), b)
}

fn put(s: &SegmentStore, blobs: &[(Hash, Vec<u8>)], retain: Retain) {
    let refs: Vec<(Hash, &[u8])> = blobs.iter().map(|(h, b)| (*h, b.as_slice())).collect();
    s.put_batch(&refs, retain).unwrap();
}

#[test]
fn put_get_verify_reopen_and_lock() {
    let dir = tempfile::tempdir().unwrap();
    let a = blob(1, 5);
    let b = blob(2, 100_000);
    {
        let s = SegmentStore::open(dir.path(), None).unwrap();
        assert!(!s.contains(&a.0).unwrap());
        put(&s, &[a.clone(), b.clone()], Retain::Keep);
        assert_eq!(s.get(&a.0).unwrap().unwrap(), a.1);
        let st = s.stats().unwrap();
        assert_eq!((st.blobs, st.live_bytes), (2, 100_005));
        s.flush().unwrap();
        let err = SegmentStore::open(dir.path(), None).err().expect("locked");
        assert!(
            err.to_string().contains("in use by another shoal process"),
            "{err}"
        );
    }
    let s = reopen(dir.path(), None);
    assert_eq!(s.get(&b.0).unwrap().unwrap(), b.1);
    assert_eq!(
        s.stats().unwrap().hits,
        2,
        "counters survive a reopen after flush"
    );
    // Corrupt the segment: the read is refused and the entry dropped.
    let seg = dir.path().join("segments").join(seg_name(1));
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(b"X", 0).unwrap();
    assert!(matches!(
        s.get(&a.0).unwrap_err(),
        StoreError::Corrupt { .. }
    ));
    assert!(!s.contains(&a.0).unwrap());
    assert_eq!(s.get(&b.0).unwrap().unwrap(), b.1);
}

/// The records of segment 1's log.
fn log_records(dir: &std::path::Path) -> Vec<(u64, Vec<(Hash, Loc)>)> {
    let mut recs = Vec::new();
    let log = reclog::log_path(&dir.join("segments").join(seg_name(1)));
    reclog::scan(&log, 0, |rec, e| recs.push((rec, e))).unwrap();
    recs
}

/// Reads for peers are checked against the CRC32 kept in the index: a corrupted byte is caught
/// (and the entry dropped) without re-hashing. A store indexed the old ways (records in sled,
/// or older, one sled entry per blob, 20 bytes, or 16 from before checksums were kept) is
/// migrated to record logs when opened; entries without a checksum fall back to the id.
#[test]
fn peer_reads_are_checked_against_the_checksum_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (blob(1, 70_000), blob(2, 80_000), blob(3, 90_000));
    let log = reclog::log_path(&dir.path().join("segments").join(seg_name(1)));
    {
        let s = SegmentStore::open(dir.path(), None).unwrap();
        put(&s, &[a.clone(), b.clone(), c.clone()], Retain::Keep);
        assert_eq!(s.get_for_peer(&a.0).unwrap().unwrap(), a.1);
        s.flush().unwrap();
    }
    // One record for the batch, each entry with the checksum of its bytes.
    let recs = log_records(dir.path());
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].0, 0);
    let entries = recs[0].1.clone();
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[0].0, a.0);
    assert_eq!(entries[0].1.crc, Some(crc32fast::hash(&a.1)));
    // Index it as stores did before logs (records in sled, a removal journaled beside them,
    // the checkpoint kept): migrated when opened, the same blobs.
    {
        let db = sled::open(dir.path().join("index")).unwrap();
        let records = db.open_tree("records").unwrap();
        records
            .insert(
                record_key(1, 0),
                encode_record(entries.iter().map(|(id, l)| (id, l))),
            )
            .unwrap();
        let mut journal = [0xffu8; 44];
        journal[4..12].copy_from_slice(&1u64.to_be_bytes());
        records.insert(journal, &[]).unwrap();
        db.flush().unwrap();
        std::fs::remove_file(&log).unwrap();
    }
    {
        let s = reopen(dir.path(), None);
        assert_eq!(s.lock().replayed, None, "rebuilt from the migrated logs");
        assert_eq!(held(&s), indexed(&s));
        assert_eq!(held(&s).len(), 3);
        assert_eq!(s.get(&c.0).unwrap().unwrap(), c.1);
        assert!(s.db.open_tree("records").unwrap().is_empty());
        s.flush().unwrap();
    }
    assert_eq!(log_records(dir.path()).len(), 1);
    // Index it the oldest way: per-blob entries, c's without a checksum.
    {
        let db = sled::open(dir.path().join("index")).unwrap();
        let legacy = db.open_tree("blobs").unwrap();
        for (id, loc) in &entries {
            let e = encode_loc(1, *loc);
            let e = if *id == c.0 { &e[..16] } else { &e[..] };
            legacy.insert(id.as_bytes(), e).unwrap();
        }
        db.flush().unwrap();
        std::fs::remove_file(&log).unwrap();
    }
    let s = reopen(dir.path(), None);
    // Migrated: a record with checksums (a, b) and one without (c).
    let crcs: Vec<Vec<bool>> = log_records(dir.path())
        .into_iter()
        .map(|(_, e)| e.iter().map(|(_, l)| l.crc.is_some()).collect())
        .collect();
    assert_eq!(crcs, vec![vec![true, true], vec![false]]);
    assert_eq!(s.get(&a.0).unwrap().unwrap(), a.1);
    assert_eq!(s.get_for_peer(&b.0).unwrap().unwrap(), b.1);
    assert_eq!(
        s.get_for_peer(&c.0).unwrap().unwrap(),
        c.1,
        "old entry, checked by id"
    );
    let seg = dir.path().join("segments").join(seg_name(1));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    // One flipped byte inside b, one inside c: both refused and dropped; a still served.
    let flip = |off: u64| {
        let mut x = [0u8];
        f.read_exact_at(&mut x, off).unwrap();
        f.write_all_at(&[x[0] ^ 0x01], off).unwrap();
    };
    flip(70_000 + 40_000);
    flip(150_000 + 12_345);
    for id in [b.0, c.0] {
        assert!(matches!(
            s.get_for_peer(&id).unwrap_err(),
            StoreError::Corrupt { .. }
        ));
        assert!(!s.contains(&id).unwrap());
        assert!(s.get_for_peer(&id).unwrap().is_none());
    }
    assert_eq!(s.get_for_peer(&a.0).unwrap().unwrap(), a.1);
}

/// Under capacity pressure the files stay within the capacity and every blob still indexed
/// reads back verified, for capacities exactly at and one byte either side of multiples of the
/// blob size.
#[test]
fn capacity_is_respected_at_and_around_the_thresholds() {
    for cap in [
        4 << 20,
        (4 << 20) - 1,
        (4 << 20) + 1,
        3 * 65_536,
        3 * 65_536 + 1,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let s = SegmentStore::open(dir.path(), Some(cap)).unwrap();
        let blobs: Vec<_> = (0..200).map(|i| blob(i, 65_536)).collect();
        for chunk in blobs.chunks(7) {
            put(&s, chunk, Retain::Keep);
            let st = s.stats().unwrap();
            assert!(st.disk_bytes <= cap, "cap {cap}: {} on disk", st.disk_bytes);
            assert!(
                st.live_bytes <= cap / 4 * 3 + 65_536,
                "cap {cap}: {} live",
                st.live_bytes
            );
        }
        let mut present = 0;
        for (h, b) in &blobs {
            if let Some(got) = s.get(h).unwrap() {
                assert_eq!(&got, b);
                present += 1;
            }
        }
        assert!(present > 0 || cap < 2 * 65_536, "cap {cap}: nothing kept");
        assert!(s.stats().unwrap().evictions > 0);
    }
}

#[test]
fn pins_survive_pressure_and_gc_frees_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 2 << 20;
    let s = reopen(dir.path(), Some(cap));
    let keep: Vec<_> = (0..8).map(|i| blob(1000 + i, 50_000)).collect();
    put(&s, &keep, Retain::Keep);
    let list: Vec<(Hash, u32)> = keep.iter().map(|(h, b)| (*h, b.len() as u32)).collect();
    s.pin("demo@v1", &list).unwrap();
    s.pin("demo@v1", &list).unwrap(); // idempotent
    assert!(matches!(
        s.pin("other@v1", &[(blob(9999, 10).0, 10)]),
        Err(StoreError::NotLocal { .. })
    ));
    for i in 0..40 {
        put(&s, &[blob(i, 100_000)], Retain::Keep);
    }
    for (h, b) in &keep {
        assert_eq!(&s.get(h).unwrap().expect("pinned blob kept"), b);
    }
    let st = s.stats().unwrap();
    assert_eq!(st.pinned_bytes, 400_000);
    assert_eq!(st.pins.len(), 1);
    assert!(st.disk_bytes <= cap, "{} > {cap}", st.disk_bytes);

    let freed = s.gc().unwrap();
    assert!(freed > 0);
    let st = s.stats().unwrap();
    assert_eq!(st.live_bytes, 400_000, "only the pinned version is left");
    assert!(s.unpin("demo@v1").unwrap());
    assert!(!s.unpin("demo@v1").unwrap());
    s.gc().unwrap();
    assert_eq!(s.stats().unwrap().live_bytes, 0);
    drop(s);
    // And the state after gc reopens cleanly.
    let s = reopen(dir.path(), Some(cap));
    assert_eq!(s.stats().unwrap().blobs, 0);
}

/// Without a capacity the store keeps no eviction state: cache fills are all admitted,
/// nothing is evicted, and gc still keeps exactly what pins hold.
#[test]
fn without_a_capacity_everything_is_kept_and_gc_keeps_the_pins() {
    let dir = tempfile::tempdir().unwrap();
    let s = SegmentStore::open(dir.path(), None).unwrap();
    let keep: Vec<_> = (0..4).map(|i| blob(2000 + i, 30_000)).collect();
    put(&s, &keep, Retain::Keep);
    let cached: Vec<_> = (0..200).map(|i| blob(3000 + i, 20_000)).collect();
    for c in cached.chunks(7) {
        put(&s, c, Retain::Cache);
    }
    for (h, b) in keep.iter().chain(&cached) {
        assert_eq!(&s.get(h).unwrap().expect("kept"), b);
    }
    let list: Vec<(Hash, u32)> = keep.iter().map(|(h, b)| (*h, b.len() as u32)).collect();
    s.pin("demo@v1", &list).unwrap();
    assert!(s.gc().unwrap() > 0);
    let st = s.stats().unwrap();
    assert_eq!((st.blobs, st.live_bytes), (4, 120_000));
    for (h, b) in &keep {
        assert_eq!(&s.get(h).unwrap().expect("pinned"), b);
    }
    assert!(s.get(&cached[0].0).unwrap().is_none());
    drop(s);
    let s = reopen(dir.path(), None);
    assert_eq!(s.stats().unwrap().blobs, 4);
    assert!(s.unpin("demo@v1").unwrap());
    s.gc().unwrap();
    assert_eq!(s.stats().unwrap().blobs, 0);
}

#[test]
fn cache_fills_keep_a_stable_part_of_a_cyclic_workload() {
    let dir = tempfile::tempdir().unwrap();
    let blobs: Vec<_> = (0..64).map(|i| blob(i, 16_384)).collect();
    // Room for about half of the blobs (live bytes are kept under 3/4 of the capacity).
    let s = SegmentStore::open(dir.path(), Some(64 * 16_384 * 2 / 3)).unwrap();
    for epoch in 0..4 {
        let mut hits = 0;
        for (h, b) in &blobs {
            match s.get(h).unwrap() {
                Some(got) => {
                    assert_eq!(&got, b);
                    hits += 1;
                }
                None => put(&s, &[(*h, b.clone())], Retain::Cache),
            }
        }
        if epoch >= 2 {
            assert!(hits >= 20, "epoch {epoch}: only {hits} of 64 hits");
        }
    }
}

/// The record logs list exactly the blobs held in the index, through evictions (removals
/// logged), a corrupt blob dropped, compactions (a segment and its log replaced by the
/// copies') and a reopen with a lower capacity (trimmed at open).
#[test]
fn index_records_follow_evictions_corruption_compaction_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 3 << 20;
    let blobs: Vec<_> = (0..120).map(|i| blob(500 + i, 40_000)).collect();
    {
        let s = SegmentStore::open(dir.path(), Some(cap)).unwrap();
        for chunk in blobs.chunks(9) {
            put(&s, chunk, Retain::Keep);
            assert_eq!(indexed(&s), held(&s));
        }
        assert!(s.stats().unwrap().evictions > 0);
        // Corrupt one held blob on disk: dropped from its record, the rest of it kept.
        let victim = *held(&s).first().unwrap();
        let (seg, loc) = s.lock().live(&victim).unwrap();
        let f = OpenOptions::new()
            .write(true)
            .open(s.seg_path(seg))
            .unwrap();
        f.write_all_at(b"\xff\x00", loc.off() + 7).unwrap();
        assert!(matches!(
            s.get(&victim).unwrap_err(),
            StoreError::Corrupt { .. }
        ));
        assert!(!indexed(&s).contains(&victim));
        assert_eq!(indexed(&s), held(&s));
        s.flush().unwrap();
    }
    // Reopened at once in the same process: a thread of the store dropped above may still
    // hold the index's lock for a moment (seen once under the full suite's load).
    let s = reopen(dir.path(), Some(cap));
    let before = held(&s);
    assert!(!before.is_empty());
    assert_eq!(indexed(&s), before);
    for (h, b) in &blobs {
        if before.contains(h) {
            assert_eq!(&s.get(h).unwrap().unwrap(), b);
        }
    }
    drop(s);
    // A lower capacity: trimmed when opened, in memory and in sled alike.
    let s = reopen(dir.path(), Some(1 << 20));
    let after = held(&s);
    assert!(after.len() < before.len() && !after.is_empty());
    assert_eq!(indexed(&s), after);
    assert!(s.stats().unwrap().disk_bytes <= 1 << 20);
}

/// Opens the store at `dir` again, waiting up to 10 s for the lock a store dropped in this
/// process may still hold.
fn reopen(dir: &std::path::Path, cap: Option<u64>) -> SegmentStore {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match SegmentStore::open(dir, cap) {
            Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r.unwrap(),
        }
    }
}

/// The record logs, read directly: every blob they list as live.
fn indexed(s: &SegmentStore) -> Vec<Hash> {
    let mut ids = Vec::new();
    let segs = s.lock().live_segs();
    for seg in segs {
        s.scan_log(seg, 0, |_, entries| {
            ids.extend(entries.into_iter().map(|(id, _)| id))
        })
        .unwrap();
    }
    ids.sort();
    ids
}

/// The blobs the index holds, checking each segment's live counts against its entries.
fn held(s: &SegmentStore) -> Vec<Hash> {
    let st = s.lock();
    let mut counted: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    let mut ids = Vec::new();
    for (id, e) in st.index.entries() {
        let Some((seg, loc)) = e.filter(|(seg, _)| st.segs.contains_key(seg)) else {
            continue;
        };
        let c = counted.entry(seg).or_default();
        c.0 += loc.stored() as u64;
        c.1 += 1;
        ids.push(id);
    }
    for (n, seg) in &st.segs {
        let c = counted.remove(n).unwrap_or_default();
        assert_eq!((seg.live_bytes, seg.live_blobs), c, "segment {n}");
    }
    assert!(
        counted.is_empty(),
        "entries in segments unknown: {counted:?}"
    );
    ids
}

/// Opening a store loads its index from the runs of its last checkpoint and replays only
/// what came after (removals journaled, records appended), also after a process was killed
/// without checkpointing; the delta in memory stays bounded however many blobs are put; a
/// run gone or damaged makes the next open rebuild the same index from the logs.
#[test]
fn the_index_is_reopened_from_its_runs_and_replays_only_what_came_after() {
    let dir = tempfile::tempdir().unwrap();
    let blobs: Vec<_> = (0..4 * DELTA_MAX as u32 + 300)
        .map(|i| blob(90_000 + i, 40))
        .collect();
    let s = SegmentStore::open(dir.path(), None).unwrap();
    for chunk in blobs.chunks(100) {
        put(&s, chunk, Retain::Keep);
        assert!(s.lock().index.delta_len() < DELTA_MAX);
    }
    let runs = s.lock().index.runs();
    assert!(
        !runs.is_empty() && runs.len() < 4,
        "runs after {} blobs: {runs:?}",
        blobs.len()
    );
    // Runs and their filters name what this user cached: private, like the segments.
    // (A merge under way may remove one meanwhile.)
    for e in std::fs::read_dir(dir.path().join("runs")).unwrap() {
        if let Ok(m) = e.unwrap().metadata() {
            assert_eq!(m.permissions().mode() & 0o777, 0o600);
        }
    }
    assert_eq!(held(&s), indexed(&s));
    drop(s);
    // Dropped cleanly: nothing to replay.
    let s = reopen(dir.path(), None);
    assert_eq!(s.lock().replayed, Some(0));
    assert_eq!(held(&s).len(), blobs.len());
    // A corrupt blob dropped (a removal journaled) and more blobs put, then "killed": the
    // next open replays those and nothing else.
    let victim = blobs[17].0;
    let (seg, loc) = s.lock().live(&victim).unwrap();
    OpenOptions::new()
        .write(true)
        .open(s.seg_path(seg))
        .unwrap()
        .write_all_at(b"\xff", loc.off())
        .unwrap();
    assert!(s.get(&victim).is_err());
    let more: Vec<_> = (0..500).map(|i| blob(200_000 + i, 40)).collect();
    put(&s, &more, Retain::Keep);
    s.flush().unwrap();
    s.crashed.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(s);
    let s = reopen(dir.path(), None);
    assert_eq!(s.lock().replayed, Some(501));
    let ids = held(&s);
    assert_eq!(ids, indexed(&s));
    assert_eq!(ids.len(), blobs.len() + more.len() - 1);
    assert!(!s.contains(&victim).unwrap());
    for (id, bytes) in blobs.iter().chain(&more).filter(|(id, _)| *id != victim) {
        assert_eq!(&s.get(id).unwrap().unwrap(), bytes);
    }
    let stats = s.stats().unwrap();
    assert_eq!(stats.blobs, ids.len() as u64);
    drop(s);
    // A run file gone: rebuilt from the logs, the same blobs.
    let run = std::fs::read_dir(dir.path().join("runs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_file(run).unwrap();
    let s = reopen(dir.path(), None);
    assert_eq!(s.lock().replayed, None);
    assert_eq!(held(&s), ids);
    let again = s.stats().unwrap();
    assert_eq!(
        (again.blobs, again.live_bytes),
        (stats.blobs, stats.live_bytes)
    );
}

/// A process killed mid-write leaves a torn frame at the end of the active segment's log: the
/// next open cuts it off, so that records appended afterwards are found by a rebuild. A log
/// whose segment compaction had already deleted is removed.
#[test]
fn a_torn_log_tail_is_cut_and_an_orphan_log_removed() {
    let dir = tempfile::tempdir().unwrap();
    let first: Vec<_> = (0..50).map(|i| blob(7_000 + i, 3_000)).collect();
    let s = SegmentStore::open(dir.path(), None).unwrap();
    put(&s, &first, Retain::Keep);
    let active = s.lock().active;
    let log = reclog::log_path(&s.seg_path(active));
    s.flush().unwrap();
    s.crashed.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(s);
    // Half a frame header and a few bytes of body.
    let mut f = OpenOptions::new().append(true).open(&log).unwrap();
    f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 9, 9]).unwrap();
    drop(f);
    let orphan = reclog::log_path(&dir.path().join("segments").join(seg_name(active + 40)));
    std::fs::write(&orphan, b"SHOALRL1").unwrap();
    let s = reopen(dir.path(), None);
    assert!(!orphan.exists());
    assert_eq!(held(&s).len(), first.len());
    let more: Vec<_> = (0..50).map(|i| blob(8_000 + i, 3_000)).collect();
    put(&s, &more, Retain::Keep);
    assert_eq!(held(&s), indexed(&s));
    drop(s);
    // Rebuilt from the logs alone: both batches.
    for e in std::fs::read_dir(dir.path().join("runs")).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let s = reopen(dir.path(), None);
    assert_eq!(s.lock().replayed, None);
    assert_eq!(held(&s).len(), first.len() + more.len());
    for (id, b) in first.iter().chain(&more) {
        assert_eq!(&s.get(id).unwrap().unwrap(), b);
    }
}

#[test]
fn a_snapshot_left_unfinished_by_a_killed_process_does_not_lock_the_store_out() {
    let dir = tempfile::tempdir().unwrap();
    let a = blob(3, 1000);
    {
        let s = SegmentStore::open(dir.path(), None).unwrap();
        put(&s, std::slice::from_ref(&a), Retain::Keep);
        s.flush().unwrap();
    }
    // What sled 0.34 leaves when killed while writing a snapshot: a short file under the
    // name it renames from, newer than any other, which it then reads first.
    let snap = dir
        .path()
        .join("index")
        .join("snap.7FFFFFFFFFFFFFFF.generating");
    std::fs::write(&snap, b"cut").unwrap();
    let s = reopen(dir.path(), None);
    assert_eq!(s.get(&a.0).unwrap().unwrap(), a.1);
    assert!(!snap.exists());
}

#[test]
fn drop_unpinned_takes_exactly_the_unpinned_among_the_ids_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let blobs: Vec<_> = (0..6).map(|i| blob(100 + i, 50_000)).collect();
    let ids: Vec<Hash> = blobs.iter().map(|b| b.0).collect();
    {
        let s = SegmentStore::open(dir.path(), None).unwrap();
        put(&s, &blobs, Retain::Keep);
        s.pin("p", &[(ids[0], 50_000)]).unwrap();
        // Asked for 0 (pinned), 1, 2 and an id never stored.
        let absent = blob(999, 10).0;
        let (n, freed) = s.drop_unpinned(&[ids[0], ids[1], ids[2], absent]).unwrap();
        assert_eq!(n, 2);
        assert!(freed >= 100_000, "compacted: {freed}");
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(s.contains(id).unwrap(), !(i == 1 || i == 2), "blob {i}");
        }
        assert_eq!(s.drop_unpinned(&[ids[1]]).unwrap(), (0, 0));
        assert!(s.losses() >= 2);
    }
    let s = reopen(dir.path(), None);
    assert_eq!(indexed(&s).len(), 4);
    for (i, b) in blobs.iter().enumerate() {
        let got = s.get(&b.0).unwrap();
        assert_eq!(got.is_some(), !(i == 1 || i == 2), "blob {i}");
    }
}

/// Blobs that compress are kept compressed (blobs that do not, as they are), and read back
/// exactly, locally and for peers; they are not handed out as file ranges (they are not in
/// the file as they are); the flag survives a reopen (records and runs), a store reopened
/// without compression still reads them, gc's compaction copies them as stored, and a
/// corrupted one is caught and dropped.
#[test]
fn compressible_blobs_are_stored_compressed_and_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let text = |i: u32| {
        let b: Vec<u8> = (0..)
            .flat_map(|k: u32| {
                format!("{i}: line {k} of a text that compresses well\n").into_bytes()
            })
            .take(60_000)
            .collect();
        (shoal_chunker::hash(&b), b)
    };
    let texts: Vec<_> = (0..20).map(text).collect();
    let randoms: Vec<_> = (0..5).map(|i| blob(7000 + i, 60_000)).collect();
    {
        let s = SegmentStore::open(dir.path(), None)
            .unwrap()
            .with_compression(true);
        put(&s, &texts, Retain::Keep);
        put(&s, &randoms, Retain::Keep);
        let st = s.stats().unwrap();
        assert_eq!(st.blobs, 25);
        assert!(
            st.live_bytes >= 5 * 60_000 && st.live_bytes < 5 * 60_000 + 20 * 60_000 / 4,
            "random kept raw, text at least 4x smaller: {} live bytes",
            st.live_bytes
        );
        for (h, b) in texts.iter().chain(&randoms) {
            assert_eq!(&s.get(h).unwrap().unwrap(), b);
            assert_eq!(&s.get_for_peer(h).unwrap().unwrap(), b);
        }
        assert!(s.locate(&texts[0].0).unwrap().is_none());
        assert_eq!(s.locate(&randoms[0].0).unwrap().unwrap().len, 60_000);
        s.flush().unwrap();
    }
    let s = reopen(dir.path(), None);
    for (h, b) in texts.iter().chain(&randoms) {
        assert_eq!(&s.get(h).unwrap().unwrap(), b, "read back after a reopen");
    }
    // Without compression, what is new goes raw; what was compressed stays readable.
    let more = text(99);
    put(&s, std::slice::from_ref(&more), Retain::Keep);
    assert_eq!(s.locate(&more.0).unwrap().unwrap().len, 60_000);
    // gc drops what no pin holds and compacts: the pinned compressed blobs are copied as
    // they were stored.
    let list: Vec<(Hash, u32)> = texts[..10]
        .iter()
        .map(|(h, b)| (*h, b.len() as u32))
        .collect();
    s.pin("t@v1", &list).unwrap();
    assert!(s.gc().unwrap() > 0);
    let st = s.stats().unwrap();
    assert_eq!(st.blobs, 10);
    assert!(st.live_bytes < 10 * 60_000 / 4, "{}", st.live_bytes);
    assert_eq!(indexed(&s), held(&s));
    for (h, b) in &texts[..10] {
        assert_eq!(&s.get(h).unwrap().unwrap(), b, "read back after compaction");
    }
    // A corrupted compressed blob is caught, locally (id) and for a peer (checksum at rest).
    for (victim, peer) in [(texts[0].0, false), (texts[1].0, true)] {
        let (seg, loc) = s.lock().live(&victim).unwrap();
        assert!(loc.zstd());
        let f = OpenOptions::new()
            .write(true)
            .open(s.seg_path(seg))
            .unwrap();
        f.write_all_at(b"\xff\x00\xff", loc.off() + loc.stored() as u64 / 2)
            .unwrap();
        let err = if peer {
            s.get_for_peer(&victim).unwrap_err()
        } else {
            s.get(&victim).unwrap_err()
        };
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(!s.contains(&victim).unwrap());
    }
    assert_eq!(&s.get(&texts[2].0).unwrap().unwrap(), &texts[2].1);
}
