//! `shoal-bench gc`: what `shoal origin gc` costs on a dataset with history: `--versions`
//! versions of `--files` files, each version rewriting `--churn` of them, published into a
//! local origin; then retention rules keeping the last `--keep`, and gc: a dry run, the run
//! that removes the expired versions (their packs kept for the grace period), and the run
//! after the grace that deletes their packs; then `shoal origin repack` of the packs left
//! (a dry run, then for real) and the gc after the grace that retires the repacked packs.
//! Reports, for each run, the objects listed, read and deleted, bytes freed and time, and the
//! origin's size at each step; then checks that every kept version verifies.

use super::{files_under, shoal, Args};
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

/// Deterministic bytes for file `i` at generation `g`.
fn content(i: u64, g: u64, len: usize) -> Vec<u8> {
    shoal_testnet::random_bytes(i ^ g.wrapping_mul(0xD1B5_4A32_D192_ED03), len)
}

fn write_file(src: &Path, i: u64, g: u64) -> Result<()> {
    let p = src.join(format!("d{:03}/f{i:06}", i % 100));
    std::fs::create_dir_all(p.parent().expect("a parent"))?;
    // 4 KiB to 60 KiB: small files, a few chunks at most.
    std::fs::write(p, content(i, g, 4096 + (i as usize * 7919) % (56 << 10)))?;
    Ok(())
}

fn run_summary(v: &Value) -> Value {
    json!({
        "seconds": v["seconds"],
        "objects_listed": v["objects_listed"],
        "objects_read": v["objects_read"],
        "objects_deleted": v["objects_deleted"],
        "objects_written": v["objects_written"],
        "packs_deleted": v["packs_deleted"],
        "bytes_freed": v["bytes_freed"],
        "retention_removed": v["retention_removed"].as_array().map_or(0, |a| a.len()),
        "live_packs": v["plan"]["live"],
        "kept_recently_removed": v["plan"]["recently_removed"],
        "retired_repacked": v["plan"]["retired"],
    })
}

pub fn run(args: &Args, versions: u64, files: u64, churn: f64, keep: u64) -> Result<Value> {
    let work = args.bench_root.join("work/gc");
    let _ = std::fs::remove_dir_all(&work);
    let src = work.join("src");
    let origin = work.join("origin");
    let home = work.join("home");
    std::fs::create_dir_all(&origin)?;
    for i in 0..files {
        write_file(&src, i, 0)?;
    }
    // A grace of 2 s, at once: nobody else publishes to this origin.
    shoal(
        &home,
        &origin,
        &["origin", "gc", "--grace", "2s", "--apply-now"],
    )?;
    let changed = ((files as f64 * churn).round() as u64).max(1);
    let mut publish_s = 0.0;
    for v in 1..=versions {
        if v > 1 {
            for k in 0..changed {
                // A different 1% each time, spread over the tree.
                let i = ((v * changed + k) * 7919) % files;
                write_file(&src, i, v)?;
            }
        }
        let (s, _) = shoal(
            &home,
            &origin,
            &[
                "publish",
                src.to_str().expect("UTF-8"),
                &format!("demo@v{v}"),
            ],
        )?;
        publish_s += s;
    }
    let origin_before: u64 = files_under(&origin)?.values().sum();
    let objects_before = files_under(&origin)?.len();
    eprintln!(
        "{versions} versions published ({publish_s:.1} s), origin {objects_before} objects, {origin_before} bytes"
    );
    shoal(
        &home,
        &origin,
        &["origin", "retain", "demo", "--keep-last", &keep.to_string()],
    )?;
    let (_, dry) = shoal(&home, &origin, &["origin", "gc", "--dry-run"])?;
    let (_, first) = shoal(&home, &origin, &["origin", "gc"])?;
    std::thread::sleep(Duration::from_millis(2500));
    let (_, second) = shoal(&home, &origin, &["origin", "gc"])?;
    let (_, third) = shoal(&home, &origin, &["origin", "gc"])?;
    if third["packs_deleted"] != 0 {
        bail!("a third gc still deleted packs: {third}");
    }
    let origin_after: u64 = files_under(&origin)?.values().sum();
    let objects_after = files_under(&origin)?.len();
    let threshold = "0.5";
    let (_, repack_dry) = shoal(
        &home,
        &origin,
        &[
            "origin",
            "repack",
            "demo",
            "--threshold",
            threshold,
            "--dry-run",
        ],
    )?;
    let (_, repack) = shoal(
        &home,
        &origin,
        &["origin", "repack", "demo", "--threshold", threshold],
    )?;
    std::thread::sleep(Duration::from_millis(2500));
    let (_, retire) = shoal(&home, &origin, &["origin", "gc"])?;
    let (_, last) = shoal(&home, &origin, &["origin", "gc"])?;
    if last["packs_deleted"] != 0 {
        bail!("a gc after the retiring one still deleted packs: {last}");
    }
    let origin_repacked: u64 = files_under(&origin)?.values().sum();
    let mut verified = 0;
    for v in versions.saturating_sub(keep) + 1..=versions {
        shoal(&home, &origin, &["verify", &format!("demo@v{v}")])?;
        verified += 1;
    }
    Ok(json!({
        "benchmark": "gc",
        "versions": versions,
        "files": files,
        "churn": churn,
        "files_changed_per_version": changed,
        "keep_last": keep,
        "publish_s_total": publish_s,
        "origin_objects_before": objects_before,
        "origin_bytes_before": origin_before,
        "origin_objects_after_gc": objects_after,
        "origin_bytes_after_gc": origin_after,
        "origin_objects_after_repack": files_under(&origin)?.len(),
        "origin_bytes_after_repack": origin_repacked,
        "dry_run": run_summary(&dry),
        "gc_removing_versions": run_summary(&first),
        "gc_after_grace": run_summary(&second),
        "gc_nothing_left": run_summary(&third),
        "repack": {
            "threshold": threshold,
            "dry_run_seconds": repack_dry["seconds"],
            "seconds": repack["seconds"],
            "packs": repack["packs"],
            "bytes": repack["bytes"],
            "live_bytes": repack["live_bytes"],
            "packs_repacked": repack["repacked"].as_array().map_or(0, |a| a.len()),
            "packs_written": repack["packs_written"],
            "bytes_written": repack["bytes_written"],
            "bytes_to_free": repack["bytes_to_free"],
        },
        "gc_retiring_repacked": run_summary(&retire),
        "kept_versions_verified": verified,
    }))
}
