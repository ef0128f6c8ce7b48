//! A dataset's lifecycle at the origin: removing a version (`shoal rm`) and collecting what no
//! version needs any more (`shoal origin gc`). Why collecting is safe while other machines
//! publish, replicate and pull is in docs/lifecycle.md; the decision itself is [`plan_gc`], pure
//! and given the store's clock, so tests run it at any time they like.

use crate::error::{Error, Result};
use crate::publish::now_unix;
use crate::Node;
use serde::Serialize;
use shoal_registry::{
    DatasetName, GcSettings, Hash, Origin, OriginError, RemovalBody, Retention, SignedRemoval,
    SignedVersion, StoredObject, TrustedKey, VersionRef,
};
use std::collections::{BTreeMap, HashSet};

/// Longest `--reason` kept in a removal record.
pub const MAX_REASON: usize = 1000;

/// What `shoal rm` did.
#[derive(Debug, Clone, Serialize)]
pub struct RemoveReport {
    pub reference: String,
    pub root: String,
    /// Tags that pointed at the version and were deleted (`--force`).
    pub tags_deleted: Vec<String>,
    /// The version had been removed before (this run finished what that one left, if anything).
    pub already_removed: bool,
    pub packs: usize,
}

/// One origin object gc deletes (or would, with `--dry-run`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Doomed {
    pub key: String,
    pub bytes: u64,
}

/// What gc decided about the packs of an origin: see [`plan_gc`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcPlan {
    /// Pack objects to delete: every index before the pack it describes.
    pub delete: Vec<Doomed>,
    /// Packs no version names, kept because an object of theirs is younger than the grace
    /// period (a publish may be writing them).
    pub young: usize,
    /// Packs kept for a removal younger than the grace period (a publish that started before
    /// the removal may still name them).
    pub recently_removed: usize,
    /// Packs named by versions (or reached from them through records of repacked packs).
    pub live: usize,
    /// Repacked packs deleted: their records are older than the grace period and cover
    /// every version reaching them (the records stay while a version names the pack).
    pub retired: usize,
    /// Objects under `packs/` whose names gc does not know: never touched.
    pub unknown: usize,
}

/// What gc read to decide: see [`plan_gc`].
pub struct GcInputs<'a> {
    /// The store's clock when gc started, before it listed anything.
    pub now: i64,
    pub grace_s: u64,
    /// Packs named by the version objects present, and those their repacked packs' records
    /// forward to (see [`reach`]).
    pub live: &'a HashSet<Hash>,
    /// Live packs that were repacked and may go (see [`retirable`]).
    pub retired: &'a HashSet<Hash>,
    /// Records of repacked packs: (key, the pack, the store's time of writing it).
    pub forwards: &'a [(String, Hash, i64)],
    /// Removal records: the store's time of writing each, and the packs its version named.
    pub removals: &'a [(i64, Vec<Hash>)],
    /// Every object under `packs/`.
    pub pack_objects: &'a [StoredObject],
}

/// `packs/<64 hex>.pack` or `.idx`, or a local directory's staging file of either
/// (`<id>.pack#N`, `<id>.idx#N`: a put killed before its rename): the pack's id and whether
/// the object is its index.
fn pack_object(key: &str) -> Option<(Hash, bool)> {
    let name = key.strip_prefix("packs/")?;
    let (hex, ext) = name.split_at_checked(64)?;
    let id: Hash = hex.parse().ok()?;
    // (Staging names come from `Origin::staging_leftovers`, which checked their `#N`.)
    match ext.split_once('#').map_or(ext, |(e, _)| e) {
        ".idx" => Some((id, true)),
        ".pack" => Some((id, false)),
        _ => None,
    }
}

/// Decides which pack objects go. A pack goes when no version object names it, no removal
/// younger than the grace period names it, and every object of it (index, pack, staging
/// leftovers) was written more than the grace period before `now`. Pure: the store's listing
/// and clock are its inputs.
pub fn plan_gc(i: &GcInputs) -> GcPlan {
    let mut plan = GcPlan::default();
    let cutoff = i.now.saturating_sub(i.grace_s as i64);
    let recent: HashSet<Hash> = i
        .removals
        .iter()
        .filter(|(at, _)| *at > cutoff)
        .flat_map(|(_, packs)| packs.iter().copied())
        .collect();
    let mut by_pack: BTreeMap<Hash, Vec<(&StoredObject, bool)>> = BTreeMap::new();
    for o in i.pack_objects {
        match pack_object(&o.key) {
            Some((id, is_index)) => by_pack.entry(id).or_default().push((o, is_index)),
            None => plan.unknown += 1,
        }
    }
    for (id, mut objects) in by_pack {
        if i.live.contains(&id) && !i.retired.contains(&id) {
            plan.live += 1;
        } else if recent.contains(&id) {
            plan.recently_removed += 1;
        } else if objects.iter().any(|(o, _)| o.modified_unix > cutoff) {
            plan.young += 1;
        } else {
            // The index first: a pack whose index is gone is not whole to any reader.
            objects.sort_by_key(|(o, is_index)| (!is_index, o.key.clone()));
            plan.retired += usize::from(i.live.contains(&id));
            plan.delete.extend(objects.into_iter().map(|(o, _)| Doomed {
                key: o.key.clone(),
                bytes: o.size,
            }));
        }
    }
    // A record goes with the last version reaching its pack (after the pack's objects).
    for (key, pack, at) in i.forwards {
        if !i.live.contains(pack) && !recent.contains(pack) && *at <= cutoff {
            plan.delete.push(Doomed {
                key: key.clone(),
                bytes: 0,
            });
        }
    }
    plan
}

/// The packs a version naming `named` reads from: those, and the packs that the records of
/// repacked ones among them forward to, and so on (at most a few records deep).
pub fn reach<'a>(
    named: impl IntoIterator<Item = &'a Hash>,
    forward: impl Fn(&Hash) -> Option<&'a [Hash]>,
) -> Vec<Hash> {
    let mut out: Vec<Hash> = Vec::new();
    let mut seen = HashSet::new();
    let mut next: Vec<Hash> = named.into_iter().copied().collect();
    for _ in 0..=MAX_FORWARD_DEPTH {
        let mut after = Vec::new();
        for p in next {
            if seen.insert(p) {
                out.push(p);
                if let Some(into) = forward(&p) {
                    after.extend_from_slice(into);
                }
            }
        }
        next = after;
    }
    out
}

/// [`reach`] through one dataset's repack records (by pack).
pub fn reach_through(
    named: &[Hash],
    forwards: &std::collections::HashMap<Hash, shoal_registry::Forward>,
) -> Vec<Hash> {
    reach(named, |p| forwards.get(p).map(|f| f.into.as_slice()))
}

/// Records followed from one pack at most (a repacked pack's new pack repacked, ...).
pub const MAX_FORWARD_DEPTH: usize = 8;

/// Which repacked packs may go: those whose record is older than the grace period (before
/// `cutoff`) and covers every version that reaches the pack (`reachers`: each pack, and the
/// (dataset, version) of every version present reaching it). A version written after the
/// repack that still names the pack (a publish that listed before the record existed)
/// keeps it: its blobs there may not be among those the repack copied. Pure.
pub fn retirable(
    forwards: &BTreeMap<(DatasetName, Hash), (i64, shoal_registry::Forward)>,
    reachers: &BTreeMap<Hash, Vec<(DatasetName, String)>>,
    cutoff: i64,
) -> HashSet<Hash> {
    reachers
        .iter()
        .filter(|(pack, by)| {
            let Some((dataset, _)) = by.first() else {
                return false;
            };
            let Some((at, f)) = forwards.get(&(dataset.clone(), **pack)) else {
                return false;
            };
            *at <= cutoff
                && by
                    .iter()
                    .all(|(d, v)| d == dataset && f.covers.iter().any(|c| c == v))
        })
        .map(|(pack, _)| *pack)
        .collect()
}

/// What `shoal origin gc` did (or would do, with `--dry-run`) in one origin.
#[derive(Debug, Clone, Serialize)]
pub struct GcReport {
    pub origin: String,
    pub dry_run: bool,
    pub grace_s: u64,
    pub datasets: usize,
    pub versions: usize,
    /// Version objects of removed versions still present (an `rm` cut short), deleted.
    pub removed_versions_deleted: Vec<String>,
    /// Versions the datasets' retention rules no longer keep, removed (as by `shoal rm`).
    pub retention_removed: Vec<String>,
    pub packs_deleted: usize,
    pub objects_deleted: usize,
    pub bytes_freed: u64,
    pub plan: GcPlan,
    /// Objects listed, read, written (removal records) and deleted (`objects_deleted`): what
    /// the run cost in requests (besides one write and one read of `_gc/clock`).
    pub objects_written: usize,
    pub objects_listed: usize,
    pub objects_read: usize,
    pub seconds: f64,
}

impl Node {
    /// Removes `target` from the first origin: refused while a tag points at it unless
    /// `force` (which deletes those tags and names them). Writes the signed removal record
    /// first, then deletes the tags and the version object, so a run cut short is finished by
    /// running it again (or by `shoal origin gc`).
    ///
    /// Cancel-safe as a removal: a cancelled one is finished by running it again.
    pub async fn remove_version(
        &self,
        target: &VersionRef,
        force: bool,
        reason: &str,
    ) -> Result<RemoveReport> {
        if reason.len() > MAX_REASON {
            return Err(Error::Usage(format!(
                "--reason is {} bytes; at most {MAX_REASON}",
                reason.len()
            )));
        }
        let origin = self.origin();
        let name = &target.dataset;
        let version = target.version.as_str();
        let trusted = self.trusted_keys()?;
        let existing = origin.removal(name, version).await?;
        let signed = origin.version(name, version).await?;
        let (root, packs) = match (&signed, &existing) {
            (Some(v), _) => (v.body.root, v.body.packs.clone()),
            (None, Some(r)) => (r.body.root, r.body.packs.clone()),
            (None, None) => {
                return Err(OriginError::NotFound {
                    origin: origin.url().to_string(),
                    what: format!("version {target}"),
                }
                .into())
            }
        };
        let mut pointing = Vec::new();
        for tag in origin.list_tags(name).await? {
            if let Some(t) = origin.tag(name, &tag).await? {
                if t.version() == version {
                    pointing.push(tag);
                }
            }
        }
        if !pointing.is_empty() && !force {
            return Err(Error::Usage(format!(
                "tag{} {} point{} at {target}: move {} (`shoal tag {name}@OTHER TAG`) or pass --force to delete {}",
                if pointing.len() == 1 { "" } else { "s" },
                pointing.join(", "),
                if pointing.len() == 1 { "s" } else { "" },
                if pointing.len() == 1 { "it" } else { "them" },
                if pointing.len() == 1 { "it" } else { "them" },
            )));
        }
        let already_removed = existing.is_some();
        let signed_now = self
            .write_removal(
                origin,
                name,
                version,
                (root, &packs),
                reason,
                &pointing,
                already_removed,
            )
            .await?;
        // The record in force: the one found, the one written, or (another remover won the
        // race to write it) the origin's.
        let record = match existing.or(signed_now) {
            Some(r) => Some(r),
            None => origin.removal(name, version).await?,
        };
        if let Some(r) = record {
            self.learn_removal(name, version, &r, &trusted);
        }
        Ok(RemoveReport {
            reference: target.to_string(),
            root: format!("b3:{root}"),
            tags_deleted: pointing,
            already_removed,
            packs: packs.len(),
        })
    }

    /// The removal itself, in the order that makes a run cut short resumable: the signed
    /// record (unless `recorded` already), then the tags, then the version object. Returns
    /// the record if this call wrote it.
    ///
    /// Cancel-safe as a removal: each step is one write or delete, in an order a rerun (of
    /// `rm` or of gc) completes.
    #[allow(clippy::too_many_arguments)]
    async fn write_removal(
        &self,
        origin: &Origin,
        name: &DatasetName,
        version: &str,
        (root, packs): (Hash, &[Hash]),
        reason: &str,
        tags: &[String],
        recorded: bool,
    ) -> Result<Option<SignedRemoval>> {
        let mut wrote = None;
        if !recorded {
            let key = self.home.secret_key()?;
            let record = SignedRemoval::sign(
                RemovalBody {
                    dataset: name.to_string(),
                    version: version.to_string(),
                    root,
                    packs: packs.to_vec(),
                    removed_unix: now_unix(),
                    reason: reason.to_string(),
                    publisher: [0; 32],
                },
                &key,
            );
            match origin.create_removal(name, &record).await {
                Ok(()) => wrote = Some(record),
                Err(OriginError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        for tag in tags {
            origin.delete_tag(name, tag).await?;
        }
        origin.delete_version(name, version).await?;
        Ok(wrote)
    }

    /// A removal record this node checked: it forgets its cached signed copy of the version,
    /// so that the version is not opened from it when the origins cannot be reached.
    pub(crate) fn learn_removal(
        &self,
        name: &DatasetName,
        version: &str,
        r: &SignedRemoval,
        trusted: &[TrustedKey],
    ) -> bool {
        if r.verify(name.as_str(), version, trusted).is_err() {
            return false;
        }
        self.home.forget_version(name.as_str(), version);
        true
    }

    /// Why `name@version` is not found, when a trusted removal record says it was removed:
    /// the one-line error to give instead of "not found".
    ///
    /// Cancel-safe: it reads, and drops a cached copy of a removed version at most.
    pub(crate) async fn removed_error(
        &self,
        name: &DatasetName,
        version: &str,
        trusted: &[TrustedKey],
    ) -> Option<Error> {
        for (i, r) in self.origins.ask_all(|o| o.removal(name, version)).await {
            let Ok(Some(r)) = r else { continue };
            if !self.learn_removal(name, version, &r, trusted) {
                continue;
            }
            let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(r.body.removed_unix);
            let reason = if r.body.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.body.reason)
            };
            return Some(Error::NotFound(format!(
                "{name}@{version} was removed from origin {} at {} by {}{reason}; versions are never reused",
                self.origins.get(i).url(),
                humantime::format_rfc3339_seconds(when),
                r.publisher(),
            )));
        }
        None
    }

    /// Collects, in the first origin, what no version needs: version objects of removed
    /// versions still present, then packs (index first) that no version names, no recent
    /// removal names, and nothing wrote within the grace period. With `dry_run`, only
    /// reports. `grace` (seconds, and whether a shorter one applies at once) changes the
    /// origin's grace period first (see [`GcSettings`]).
    ///
    /// Cancel-safe as a collection: every step is idempotent and re-derived from the
    /// listings, so the next run completes a cancelled one (docs/lifecycle.md).
    pub async fn origin_gc(&self, dry_run: bool, grace: Option<(u64, bool)>) -> Result<GcReport> {
        let started = std::time::Instant::now();
        let origin = self.origin();
        if !origin.writable() {
            return Err(Error::Usage(format!(
                "origin {} is read-only (http); run gc against the store it serves",
                origin.url()
            )));
        }
        // The store's clock first, before anything is listed: everything written after it is
        // young by definition, and every version written before it is in the listings below.
        let now = origin.store_now().await?;
        let now_u = now.max(0) as u64;
        let mut settings = origin.gc_settings().await?;
        if let Some((g, at_once)) = grace {
            let changed = GcSettings {
                grace_s: g,
                previous_grace_s: if at_once {
                    g
                } else {
                    settings.effective_grace_s(now_u)
                },
                changed_unix: now_u,
            };
            if changed.effective_grace_s(now_u) != settings.effective_grace_s(now_u)
                || g != settings.grace_s
            {
                settings = changed;
                if !dry_run {
                    origin.set_gc_settings(&settings).await?;
                }
            }
        }
        let grace_s = settings.effective_grace_s(now_u);
        let mut read = 0usize;
        let datasets = origin.list_datasets().await?;
        let mut listed: usize = datasets.values().map(|d| d.objects).sum();
        let mut live = HashSet::new();
        let mut removals = Vec::new();
        let mut versions = 0usize;
        // Version objects of removed versions still present (an `rm` cut short).
        let mut removed_versions: Vec<(&DatasetName, &str)> = Vec::new();
        let mut expired_versions = Vec::new();
        let mut retention_deleted = 0usize;
        let mut written = 0usize;
        // Records of repacked packs, by (dataset, pack); and every pack a version present
        // reaches, with the versions reaching it.
        let mut forwards: BTreeMap<(DatasetName, Hash), (i64, shoal_registry::Forward)> =
            BTreeMap::new();
        let mut forward_keys: Vec<(String, Hash, i64)> = Vec::new();
        let mut reachers: BTreeMap<Hash, Vec<(DatasetName, String)>> = BTreeMap::new();
        for (name, d) in &datasets {
            for (p, at) in &d.forwards {
                let Ok(pack) = p.parse::<Hash>() else {
                    continue;
                };
                read += 1;
                match origin.forward(name, &pack).await {
                    Ok(Some(f)) => {
                        forward_keys.push((format!("datasets/{name}/_repacked/{pack}"), pack, *at));
                        forwards.insert((name.clone(), pack), (*at, f));
                    }
                    Ok(None) => {}
                    // A record gc cannot read may forward to packs versions need.
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let reach_in = |name: &DatasetName, packs: &[Hash]| {
            reach(packs, |p| {
                forwards
                    .get(&(name.clone(), *p))
                    .map(|(_, f)| f.into.as_slice())
            })
        };
        for (name, d) in &datasets {
            for (v, at) in &d.removals {
                read += 1;
                match origin.removal(name, v).await {
                    Ok(Some(r)) => removals.push((*at, reach_in(name, &r.body.packs))),
                    Ok(None) => {}
                    // A record gc cannot read protects nothing it could name: stop rather
                    // than guess (it may list packs a recent publish leans on).
                    Err(e) => return Err(e.into()),
                }
            }
            let removed: HashSet<&str> = d.removals.iter().map(|(v, _)| v.as_str()).collect();
            let rules = match d.retention {
                true => {
                    read += 1;
                    origin.retention(name).await?
                }
                false => None,
            };
            // (name, publish time, tagged, packs, root) of each version present, for the rules.
            let mut present: Vec<(String, u64, bool, Vec<Hash>, Hash)> = Vec::new();
            let mut tags_of: BTreeMap<String, Vec<String>> = BTreeMap::new();
            if rules.is_some() {
                for t in &d.tags {
                    read += 1;
                    if let Some(tag) = origin.tag(name, t).await? {
                        tags_of
                            .entry(tag.version().to_string())
                            .or_default()
                            .push(t.clone());
                    }
                }
            }
            for v in &d.versions {
                if removed.contains(v.as_str()) {
                    removed_versions.push((name, v));
                    continue;
                }
                read += 1;
                let signed: SignedVersion = match origin.version(name, v).await {
                    Ok(Some(s)) => s,
                    Ok(None) => continue,
                    Err(e) => {
                        return Err(Error::Corrupt {
                            what: format!("version object {name}@{v} in {}", origin.url()),
                            reason: format!(
                                "{e}; gc cannot tell which packs it needs, so it deletes nothing (remove the object or fix it)"
                            ),
                        })
                    }
                };
                present.push((
                    v.clone(),
                    signed.body.created_unix,
                    tags_of.contains_key(v),
                    signed.body.packs,
                    signed.body.root,
                ));
            }
            let expired: HashSet<String> = match &rules {
                Some(r) => {
                    let list: Vec<(String, u64, bool)> =
                        present.iter().map(|p| (p.0.clone(), p.1, p.2)).collect();
                    r.expired(&list, now_u)
                        .into_iter()
                        .map(str::to_string)
                        .collect()
                }
                None => HashSet::new(),
            };
            for (v, _, _, packs, root) in present {
                if !expired.contains(&v) {
                    versions += 1;
                    for p in reach_in(name, &packs) {
                        live.insert(p);
                        reachers
                            .entry(p)
                            .or_default()
                            .push((name.clone(), v.clone()));
                    }
                    continue;
                }
                let tags = tags_of.remove(&v).unwrap_or_default();
                if !dry_run {
                    let why = format!(
                        "retention rules of {name}: {}",
                        rules.as_ref().map(describe_rules).unwrap_or_default()
                    );
                    self.write_removal(origin, name, &v, (root, &packs), &why, &tags, false)
                        .await?;
                    // The version object and its tags deleted, a removal record written.
                    retention_deleted += 1 + tags.len();
                    written += 1;
                }
                // Kept for the grace period like any recent removal.
                removals.push((now, reach_in(name, &packs)));
                expired_versions.push(format!("{name}@{v}"));
            }
        }
        let mut pack_objects = origin.list_stored("packs").await?;
        pack_objects.extend(origin.staging_leftovers("packs")?);
        listed += pack_objects.len();
        let retired = retirable(&forwards, &reachers, now.saturating_sub(grace_s as i64));
        let plan = plan_gc(&GcInputs {
            now,
            grace_s,
            live: &live,
            retired: &retired,
            forwards: &forward_keys,
            removals: &removals,
            pack_objects: &pack_objects,
        });
        let mut report = GcReport {
            origin: origin.url().to_string(),
            dry_run,
            grace_s,
            datasets: datasets.len(),
            versions,
            removed_versions_deleted: removed_versions
                .iter()
                .map(|(n, v)| format!("{n}@{v}"))
                .collect(),
            retention_removed: expired_versions,
            packs_deleted: plan
                .delete
                .iter()
                .filter_map(|d| pack_object(&d.key))
                .map(|(id, _)| id)
                .collect::<HashSet<_>>()
                .len(),
            objects_deleted: retention_deleted,
            objects_written: written,
            bytes_freed: plan.delete.iter().map(|d| d.bytes).sum(),
            plan,
            objects_listed: listed,
            objects_read: read,
            seconds: 0.0,
        };
        if !dry_run {
            for (n, v) in &removed_versions {
                origin.delete_version(n, v).await?;
                report.objects_deleted += 1;
            }
            for d in &report.plan.delete {
                delete_pack_object(origin, &d.key).await?;
                report.objects_deleted += 1;
            }
        }
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
}

/// The rules in words, for removal records and `shoal origin retain`.
pub fn describe_rules(r: &Retention) -> String {
    let mut parts = Vec::new();
    if let Some(n) = r.keep_last {
        parts.push(format!("keep the last {n}"));
    }
    if r.keep_tagged {
        parts.push("keep tagged versions".to_string());
    }
    if let Some(t) = r.keep_younger_than_s {
        parts.push(format!(
            "keep versions younger than {}",
            humantime::format_duration(std::time::Duration::from_secs(t))
        ));
    }
    if parts.is_empty() {
        "keep nothing".to_string()
    } else {
        parts.join(", ")
    }
}

/// Deletes one pack object (a local origin's staging file from the directory).
///
/// Cancel-safe: one delete.
async fn delete_pack_object(origin: &Origin, key: &str) -> Result<()> {
    if key.contains('#') {
        origin.delete_staging(key)?;
    } else {
        origin.delete_rel(key).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(id: &Hash, ext: &str, size: u64, at: i64) -> StoredObject {
        StoredObject {
            key: format!("packs/{id}.{ext}"),
            size,
            modified_unix: at,
        }
    }

    fn id(n: u8) -> Hash {
        shoal_chunker::hash(&[n])
    }

    #[test]
    fn only_old_unnamed_packs_go_index_first() {
        let (a, b, c, d, e) = (id(1), id(2), id(3), id(4), id(5));
        let objects = vec![
            // a: named by a version.
            obj(&a, "pack", 100, 0),
            obj(&a, "idx", 10, 0),
            // b: nobody names it, old: goes.
            obj(&b, "pack", 200, 0),
            obj(&b, "idx", 20, 0),
            // c: nobody names it, its index written just now (a publish finishing it).
            obj(&c, "pack", 300, 0),
            obj(&c, "idx", 30, 990),
            // d: named by a removal 10 s ago.
            obj(&d, "pack", 400, 0),
            obj(&d, "idx", 40, 0),
            // e: staging leftovers of an old copy (a publish killed mid-put), no index.
            StoredObject {
                key: format!("packs/{e}.pack#7"),
                size: 500,
                modified_unix: 0,
            },
            StoredObject {
                key: format!("packs/{e}.idx#1"),
                size: 50,
                modified_unix: 0,
            },
            StoredObject {
                key: format!("packs/{e}.packed"),
                size: 1,
                modified_unix: 0,
            },
            StoredObject {
                key: "packs/README".into(),
                size: 1,
                modified_unix: 0,
            },
        ];
        let live: HashSet<Hash> = [a].into();
        let removals = vec![(990, vec![d]), (0, vec![b])];
        let plan = plan_gc(&GcInputs {
            now: 1000,
            grace_s: 100,
            live: &live,
            retired: &HashSet::new(),
            forwards: &[],
            removals: &removals,
            pack_objects: &objects,
        });
        let keys: Vec<&str> = plan.delete.iter().map(|d| d.key.as_str()).collect();
        let want_b = [format!("packs/{b}.idx"), format!("packs/{b}.pack")];
        for want_e in [format!("packs/{e}.pack#7"), format!("packs/{e}.idx#1")] {
            assert!(keys.contains(&want_e.as_str()), "{keys:?}");
        }
        let bi = keys.iter().position(|k| *k == want_b[0]).unwrap();
        let bp = keys.iter().position(|k| *k == want_b[1]).unwrap();
        assert!(bi < bp, "index before pack: {keys:?}");
        assert_eq!(keys.len(), 4, "{keys:?}");
        assert_eq!(plan.live, 1);
        assert_eq!(plan.young, 1);
        assert_eq!(plan.recently_removed, 1);
        assert_eq!(
            plan.unknown, 2,
            "README and a name that only starts like a pack's"
        );

        // The same a grace period later: the removal and the young pack have aged.
        let plan = plan_gc(&GcInputs {
            now: 1200,
            grace_s: 100,
            live: &live,
            retired: &HashSet::new(),
            forwards: &[],
            removals: &removals,
            pack_objects: &objects,
        });
        assert_eq!(plan.delete.len(), 8, "{:?}", plan.delete);
        assert_eq!((plan.live, plan.young, plan.recently_removed), (1, 0, 0));
    }

    #[test]
    fn repacked_packs_go_once_their_record_is_old_and_covers_every_reader() {
        let (p, n, m, q) = (id(1), id(2), id(3), id(4));
        let demo: DatasetName = "demo".parse().unwrap();
        let other: DatasetName = "other".parse().unwrap();
        let fwd = |pack: Hash, into: Vec<Hash>, covers: &[&str]| shoal_registry::Forward {
            pack,
            into,
            covers: covers.iter().map(|c| c.to_string()).collect(),
            repacked_unix: 0,
        };
        // p was repacked into n, and n later into m.
        let mut forwards = BTreeMap::new();
        forwards.insert((demo.clone(), p), (100, fwd(p, vec![n], &["v1", "v2"])));
        forwards.insert((demo.clone(), n), (500, fwd(n, vec![m], &["v1", "v2"])));
        let into = |x: &Hash| {
            forwards
                .get(&(demo.clone(), *x))
                .map(|(_, f)| f.into.as_slice())
        };
        assert_eq!(reach(&[p, q], into), vec![p, q, n, m]);
        // A loop (a lying record) ends.
        let (to_n, to_p) = ([n], [p]);
        let looped = |x: &Hash| Some(if *x == p { &to_n[..] } else { &to_p[..] });
        assert_eq!(reach(&[p], looped), vec![p, n]);

        let readers = |vs: &[(&DatasetName, &str)]| {
            vs.iter()
                .map(|(d, v)| ((*d).clone(), v.to_string()))
                .collect::<Vec<_>>()
        };
        let mut reachers = BTreeMap::new();
        reachers.insert(p, readers(&[(&demo, "v1"), (&demo, "v2")]));
        reachers.insert(n, readers(&[(&demo, "v1"), (&demo, "v2")]));
        reachers.insert(m, readers(&[(&demo, "v1"), (&demo, "v2")]));
        // p's record is old enough, n's not yet.
        assert_eq!(retirable(&forwards, &reachers, 200), [p].into());
        assert_eq!(retirable(&forwards, &reachers, 600), [p, n].into());
        // A version written since (it may lean on blobs the repack did not copy) keeps p.
        reachers
            .get_mut(&p)
            .unwrap()
            .push((demo.clone(), "v3".into()));
        assert_eq!(retirable(&forwards, &reachers, 600), [n].into());
        // So does another dataset's version naming the same pack.
        reachers.get_mut(&n).unwrap().push((other, "v1".into()));
        assert!(retirable(&forwards, &reachers, 600).is_empty());

        // In the plan: a retired pack goes like an unnamed one (its objects old, no recent
        // removal); its record stays while a version reaches the pack, and goes after.
        let objects = vec![obj(&p, "pack", 100, 0), obj(&p, "idx", 10, 0)];
        let live: HashSet<Hash> = [p, n, m].into();
        let records = vec![(format!("datasets/demo/_repacked/{p}"), p, 100)];
        let plan = plan_gc(&GcInputs {
            now: 1000,
            grace_s: 100,
            live: &live,
            retired: &[p].into(),
            forwards: &records,
            removals: &[],
            pack_objects: &objects,
        });
        assert_eq!(plan.retired, 1);
        assert_eq!(plan.delete.len(), 2, "{:?}", plan.delete);
        let none: HashSet<Hash> = HashSet::new();
        let plan = plan_gc(&GcInputs {
            now: 1000,
            grace_s: 100,
            live: &none,
            retired: &none,
            forwards: &records,
            removals: &[],
            pack_objects: &[],
        });
        assert_eq!(
            plan.delete.len(),
            1,
            "the record of a pack nobody reads goes"
        );
        // Not while a recent removal names the pack.
        let plan = plan_gc(&GcInputs {
            now: 1000,
            grace_s: 100,
            live: &none,
            retired: &none,
            forwards: &records,
            removals: &[(950, vec![p])],
            pack_objects: &[],
        });
        assert!(plan.delete.is_empty());
    }

    #[test]
    fn a_shorter_grace_waits_for_the_longer_one() {
        let s = GcSettings {
            grace_s: 10,
            previous_grace_s: 1000,
            changed_unix: 5000,
        };
        assert_eq!(s.effective_grace_s(5001), 1000);
        assert_eq!(s.effective_grace_s(5999), 1000);
        assert_eq!(s.effective_grace_s(6000), 10);
        let longer = GcSettings {
            grace_s: 2000,
            previous_grace_s: 1000,
            changed_unix: 5000,
        };
        assert_eq!(longer.effective_grace_s(5001), 2000);
    }
}
