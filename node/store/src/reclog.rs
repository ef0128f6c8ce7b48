//! Record logs: the store's source of truth for which blobs each segment holds, one
//! append-only file beside each segment (`00000007.rec` for `00000007.seg`).
//!
//! Each batch of blobs appended to a segment adds one *record* frame listing them (id,
//! offset, length, CRC32 of the bytes); removing blobs (eviction, a corrupt read, `gc`) adds
//! a *removal* frame naming them by id and offset. A segment's live blobs are its records'
//! entries less its removals; the log is deleted with its segment when compaction retires it.
//! The index (sorted runs, see `runs`) is derived from the logs and rebuilt from them if
//! its checkpoint is lost.
//!
//! Reading costs memory for a segment's removals only (records stream through): a store of
//! millions of blobs keeps none of its records in memory, which sled, which held them before,
//! did (48 bytes a blob however small its cache was set).
//!
//! A frame is its body's length and CRC32 (4 bytes each, little-endian) then the body. A frame
//! that is cut short or fails its checksum (a process killed mid-write, a power cut) ends the
//! log for readers; the active segment's log is truncated to its last whole frame when the
//! store opens, so that later frames are not written after it.

use crate::Loc;
use shoal_chunker::Hash;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"SHOALRL1";
/// A record whose entries carry CRCs, or (migrated from before checksums were kept) do not.
const REC_CRC: u8 = 1;
const REC_NO_CRC: u8 = 2;
/// A removal.
const DEL: u8 = 3;
/// Per blob in a record: id (32), offset (8), length (4), CRC32 (4; zero without), big-endian.
const REC_ENTRY: usize = 48;
/// Per blob in a removal: id (32), offset (4).
const DEL_ENTRY: usize = 36;
/// A frame's body is at most this long (a record of a 256 MiB segment of 4-byte blobs would
/// be 3 GiB, but a batch is bounded well below: anything longer is damage).
const BODY_MAX: u32 = 256 << 20;

/// The log of segment file `seg` (same directory, `.rec` for `.seg`).
pub(crate) fn log_path(seg: &Path) -> PathBuf {
    seg.with_extension("rec")
}

/// Opens a log for appending, creating it (with its magic) if new; returns it and its
/// length. The length is that of its last whole frame: a torn tail is cut off first. Frames
/// before byte `whole` are known whole (synced: a checkpoint's watermark) and not read again,
/// unless the log is shorter than that.
pub(crate) fn open_append(path: &Path, whole: u64) -> std::io::Result<(File, u64)> {
    let mut f = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    let len = f.metadata()?.len();
    let from = if whole <= len { whole } else { 0 };
    let valid = match len < MAGIC.len() as u64 {
        // New, or cut short before its magic was whole.
        true => 0,
        false => Reader::open(path, from)?.map_or(0, |r| r.valid_len()),
    };
    if valid < MAGIC.len() as u64 {
        // New, or not a record log at all.
        f.set_len(0)?;
        f.write_all(MAGIC)?;
        return Ok((f, MAGIC.len() as u64));
    }
    if valid < len {
        tracing::warn!(
            log = %path.display(),
            cut = len - valid,
            "cutting a torn tail off a store record log"
        );
        f.set_len(valid)?;
    }
    Ok((f, valid))
}

/// Appends one frame at `*len` (the file's whole-frame length), which it advances; a failed
/// write is cut back off, so that the log stays readable to its end.
pub(crate) fn append(f: &mut File, len: &mut u64, frame: &[u8]) -> std::io::Result<()> {
    match f.write_all(frame) {
        Ok(()) => {
            *len += frame.len() as u64;
            Ok(())
        }
        Err(e) => {
            let _ = f.set_len(*len);
            Err(e)
        }
    }
}

fn frame(body: Vec<u8>) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + body.len());
    v.extend_from_slice(&(body.len() as u32).to_le_bytes());
    v.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    v.extend_from_slice(&body);
    v
}

/// A record frame: the blobs of one batch, at offsets from `rec` on (all with CRCs, or all
/// without).
pub(crate) fn record<'a>(rec: u64, entries: impl Iterator<Item = (&'a Hash, &'a Loc)>) -> Vec<u8> {
    frame(record_body(&rec.to_le_bytes(), entries))
}

/// A record's body: its kind, `head`, then its entries (without `head`, the value of a
/// record in sled's tree "records", from before logs).
pub(crate) fn record_body<'a>(
    head: &[u8],
    entries: impl Iterator<Item = (&'a Hash, &'a Loc)>,
) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + head.len() + 64 * REC_ENTRY);
    v.push(REC_CRC);
    v.extend_from_slice(head);
    for (id, loc) in entries {
        if loc.crc.is_none() {
            v[0] = REC_NO_CRC;
        }
        v.extend_from_slice(id.as_bytes());
        v.extend_from_slice(&loc.off().to_be_bytes());
        v.extend_from_slice(&loc.len.to_be_bytes());
        v.extend_from_slice(&loc.crc.unwrap_or(0).to_be_bytes());
    }
    v
}

/// A record's entries (`body` after its kind and head), listed by record `rec`.
pub(crate) fn record_entries(kind: u8, body: &[u8], rec: u64) -> Option<Vec<(Hash, Loc)>> {
    if !(kind == REC_CRC || kind == REC_NO_CRC) || body.len() % REC_ENTRY != 0 {
        return None;
    }
    body.chunks_exact(REC_ENTRY)
        .map(|e| {
            Some((
                Hash(e[..32].try_into().ok()?),
                Loc {
                    off: u32::try_from(u64::from_be_bytes(e[32..40].try_into().ok()?)).ok()?,
                    len: u32::from_be_bytes(e[40..44].try_into().ok()?),
                    crc: (kind == REC_CRC)
                        .then(|| u32::from_be_bytes(e[44..48].try_into().expect("4 bytes"))),
                    rec: u32::try_from(rec).ok()?,
                },
            ))
        })
        .collect()
}

/// A removal frame: these blobs, by id and offset, are no longer live in the segment.
pub(crate) fn removal<'a>(gone: impl Iterator<Item = (&'a Hash, u32)>) -> Vec<u8> {
    let mut v = vec![DEL];
    for (id, off) in gone {
        v.extend_from_slice(id.as_bytes());
        v.extend_from_slice(&off.to_le_bytes());
    }
    frame(v)
}

/// One decoded frame.
enum Frame {
    Record(u64, Vec<(Hash, Loc)>),
    Removal(Vec<(Hash, u32)>),
}

fn decode(body: &[u8]) -> Option<Frame> {
    let (&kind, rest) = body.split_first()?;
    match kind {
        REC_CRC | REC_NO_CRC => {
            let rec = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
            Some(Frame::Record(rec, record_entries(kind, &rest[8..], rec)?))
        }
        DEL if rest.len() % DEL_ENTRY == 0 => Some(Frame::Removal(
            rest.chunks_exact(DEL_ENTRY)
                .map(|e| {
                    (
                        Hash(e[..32].try_into().expect("32")),
                        u32::from_le_bytes(e[32..].try_into().expect("4")),
                    )
                })
                .collect(),
        )),
        _ => None,
    }
}

/// Reads a log's frames in order, up to the first that is torn or damaged.
struct Reader {
    r: BufReader<File>,
    pos: u64,
}

impl Reader {
    /// Reads from byte `from` on (the start of a frame, or the first frame if before it);
    /// `None` if the log does not exist or is not a record log.
    fn open(path: &Path, from: u64) -> std::io::Result<Option<Reader>> {
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut r = BufReader::with_capacity(256 << 10, f);
        let mut magic = [0u8; 8];
        match r.read_exact(&mut magic) {
            Ok(()) if &magic == MAGIC => {
                let pos = from.max(MAGIC.len() as u64);
                r.seek(std::io::SeekFrom::Start(pos))?;
                Ok(Some(Reader { r, pos }))
            }
            Ok(()) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The next frame; `Ok(None)` at the end or at a frame cut short or damaged.
    fn next_frame(&mut self) -> std::io::Result<Option<Frame>> {
        let mut head = [0u8; 8];
        if let Err(e) = self.r.read_exact(&mut head) {
            return match e.kind() {
                std::io::ErrorKind::UnexpectedEof => Ok(None),
                _ => Err(e),
            };
        }
        let len = u32::from_le_bytes(head[..4].try_into().expect("4"));
        let crc = u32::from_le_bytes(head[4..].try_into().expect("4"));
        if len > BODY_MAX {
            return Ok(None);
        }
        let mut body = vec![0u8; len as usize];
        if let Err(e) = self.r.read_exact(&mut body) {
            return match e.kind() {
                std::io::ErrorKind::UnexpectedEof => Ok(None),
                _ => Err(e),
            };
        }
        if crc32fast::hash(&body) != crc {
            return Ok(None);
        }
        let Some(f) = decode(&body) else {
            return Ok(None);
        };
        self.pos += 8 + len as u64;
        Ok(Some(f))
    }

    /// The length of the log up to its last whole frame.
    fn valid_len(mut self) -> u64 {
        while let Ok(Some(_)) = self.next_frame() {}
        self.pos
    }
}

/// Calls `f` with each record of the log at `path` from byte `from` on (0: all of it; a
/// length [`open_append`] returned: what was appended since), less the blobs the removals
/// from there on name (records left empty are skipped), in order. A missing log holds
/// nothing.
pub(crate) fn scan(
    path: &Path,
    from: u64,
    mut f: impl FnMut(u64, Vec<(Hash, Loc)>),
) -> std::io::Result<()> {
    // The removals first (they follow the records they name), then the records.
    let mut removed: rustc_hash::FxHashSet<(Hash, u32)> = Default::default();
    let Some(mut r) = Reader::open(path, from)? else {
        return Ok(());
    };
    while let Some(frame) = r.next_frame()? {
        if let Frame::Removal(gone) = frame {
            removed.extend(gone);
        }
    }
    let Some(mut r) = Reader::open(path, from)? else {
        return Ok(());
    };
    while let Some(frame) = r.next_frame()? {
        if let Frame::Record(rec, mut entries) = frame {
            if !removed.is_empty() {
                entries.retain(|(id, loc)| !removed.contains(&(*id, loc.off)));
            }
            if !entries.is_empty() {
                f(rec, entries);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(off: u32, len: u32) -> Loc {
        Loc {
            off,
            len,
            crc: Some(off ^ len),
            rec: 0,
        }
    }

    fn read_all(path: &Path) -> Vec<(u64, Vec<Hash>)> {
        let mut out = Vec::new();
        scan(path, 0, |rec, e| {
            out.push((rec, e.into_iter().map(|(id, _)| id).collect()))
        })
        .unwrap();
        out
    }

    /// Records less their removals; a torn or damaged tail ends the log and is cut off when
    /// it is next opened for appending, so that frames written after it are read.
    #[test]
    fn records_less_removals_and_torn_tails_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000001.rec");
        let (a, b, c) = (Hash([1; 32]), Hash([2; 32]), Hash([3; 32]));
        let (mut f, mut len) = open_append(&path, 0).unwrap();
        let r0 = [(a, loc(0, 10)), (b, loc(10, 5))];
        append(&mut f, &mut len, &record(0, r0.iter().map(|(h, l)| (h, l)))).unwrap();
        let at_r1 = len;
        let r1 = [(c, loc(15, 7))];
        append(
            &mut f,
            &mut len,
            &record(15, r1.iter().map(|(h, l)| (h, l))),
        )
        .unwrap();
        // b removed; a removal naming a at another offset removes nothing.
        append(&mut f, &mut len, &removal([(&b, 10), (&a, 99)].into_iter())).unwrap();
        assert_eq!(read_all(&path), vec![(0, vec![a]), (15, vec![c])]);
        let mut from = Vec::new();
        scan(&path, at_r1, |rec, _| from.push(rec)).unwrap();
        assert_eq!(from, vec![15]);
        // A frame cut short (as by a kill mid-write): readers stop before it.
        let whole = len;
        let r2 = [(b, loc(22, 3))];
        let torn = record(22, r2.iter().map(|(h, l)| (h, l)));
        f.write_all(&torn[..torn.len() - 3]).unwrap();
        drop(f);
        assert_eq!(read_all(&path).len(), 2);
        let (mut f, mut len) = open_append(&path, 0).unwrap();
        assert_eq!(len, whole);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
        append(&mut f, &mut len, &torn).unwrap();
        assert_eq!(
            read_all(&path),
            vec![(0, vec![a]), (15, vec![c]), (22, vec![b])]
        );
        // A flipped byte inside a frame: the log ends before it.
        let bytes = std::fs::read(&path).unwrap();
        let mut bad = bytes.clone();
        bad[whole as usize + 20] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert_eq!(read_all(&path).len(), 2);
        // Not a log at all, or missing: nothing.
        std::fs::write(&path, b"garbage!garbage").unwrap();
        assert!(read_all(&path).is_empty());
        assert!(read_all(&dir.path().join("none.rec")).is_empty());
    }
}
