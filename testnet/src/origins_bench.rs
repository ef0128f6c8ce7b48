//! Data where it lives and copies between origins: in-place publish against a packed one
//! (time, bytes written to the Shoal origin), from a local directory and from an S3 server
//! (moto); `shoal replicate` of a version and then the next, between two local origins and into
//! S3, against `rclone sync` and `aws s3 sync` of the same origin directory.

use super::{ensure_data, files_under, Args};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bytes of every file under `dir` (0 if it does not exist).
fn du(dir: &Path) -> u64 {
    files_under(dir).map(|f| f.values().sum()).unwrap_or(0)
}

/// [`super::shoal_with`] with the origin as a string (a path or a URL).
fn shoal(
    home: &Path,
    origin: &str,
    env: &[(String, String)],
    args: &[&str],
) -> Result<(f64, Value)> {
    super::shoal_with(home, origin.as_ref(), env, args)
}

/// moto's S3 server on a free port with one bucket, killed on drop.
struct Moto {
    child: std::process::Child,
    env: Vec<(String, String)>,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto() -> Result<Moto> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("moto_server (pip install 'moto[server]')")?;
    let env: Vec<(String, String)> = [
        ("AWS_ACCESS_KEY_ID", "test".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
        ("AWS_DEFAULT_REGION", "us-east-1".to_string()),
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let m = Moto { child, env };
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("moto_server did not listen within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    aws(&m, &["s3", "mb", "s3://bench"])?;
    Ok(m)
}

/// Runs `aws ARGS` against moto; returns its stdout.
fn aws(m: &Moto, args: &[&str]) -> Result<String> {
    let out = Command::new("aws")
        .args(args)
        .envs(m.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .context("aws (pip install awscli)")?;
    if !out.status.success() {
        bail!(
            "aws {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Bytes `aws s3 sync SRC DST` uploaded, from its `upload: <local> to <remote>` lines.
fn aws_sync(m: &Moto, src: &Path, dst: &str) -> Result<(f64, u64)> {
    let t = Instant::now();
    let out = aws(
        m,
        &[
            "s3",
            "sync",
            "--no-progress",
            &src.display().to_string(),
            dst,
        ],
    )?;
    let secs = t.elapsed().as_secs_f64();
    let mut bytes = 0;
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("upload: ") {
            if let Some((local, _)) = rest.split_once(" to ") {
                bytes += std::fs::metadata(local).map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    Ok((secs, bytes))
}

/// Bytes `rclone sync SRC DST` (local to local) moved: the sizes of files new or changed at
/// the destination.
fn rclone_sync(src: &Path, dst: &Path) -> Result<(f64, u64)> {
    let before = files_under(dst).unwrap_or_default();
    let t = Instant::now();
    let st = Command::new("rclone")
        .args(["sync", "--quiet"])
        .arg(src)
        .arg(dst)
        .status()
        .context("rclone (apt install rclone)")?;
    if !st.success() {
        bail!("rclone sync failed");
    }
    let secs = t.elapsed().as_secs_f64();
    let after = files_under(dst)?;
    let moved = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(v))
        .map(|(_, v)| v)
        .sum();
    Ok((secs, moved))
}

pub fn run(args: &Args, peers: bool) -> Result<Value> {
    let data = ensure_data(args)?;
    let work = args.bench_root.join("work/origins-data");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let home = work.join("publisher");
    let at = |p: PathBuf| p.display().to_string();
    let mut out = json!({});

    // In place against packed, from a local directory.
    for ds in ["shards_v1", "images_v1"] {
        let dir = data.join(ds);
        let bytes = du(&dir);
        let name = ds.split('_').next().unwrap_or(ds);
        let mut row = json!({ "bytes": bytes });
        for (mode, extra) in [("packed", None), ("in_place", Some("--in-place"))] {
            let origin = work.join(format!("{mode}-{ds}"));
            let mut a = vec!["publish", dir.to_str().context("utf-8 path")?];
            let target = format!("{name}@v1");
            a.push(&target);
            a.extend(extra);
            let (secs, r) = shoal(&home, &at(origin.clone()), &[], &a)?;
            row[mode] = json!({
                "seconds": secs,
                "bytes_written": du(&origin),
                "written_over_dataset": du(&origin) as f64 / bytes as f64,
                "new_bytes_uploaded": r["new_bytes_uploaded"],
            });
        }
        out[format!("local_{ds}")] = row;
    }

    // The same from S3 (moto), shards only: 20,000 PUTs of images into moto take minutes.
    let m = moto()?;
    let shards = data.join("shards_v1");
    let (up, _) = aws_sync(&m, &shards, "s3://bench/shards_v1")?;
    let mut row = json!({ "bytes": du(&shards), "aws_s3_sync_upload_seconds": up });
    for (mode, extra) in [("packed", None), ("in_place", Some("--in-place"))] {
        let origin = work.join(format!("s3-{mode}"));
        let mut a = vec!["publish", "s3://bench/shards_v1", "shards@v1"];
        a.extend(extra);
        let (secs, r) = shoal(&home, &at(origin.clone()), &m.env, &a)?;
        row[mode] = json!({
            "seconds": secs,
            "bytes_written": du(&origin),
            "new_bytes_uploaded": r["new_bytes_uploaded"],
        });
    }
    out["s3_shards_v1"] = row;

    // Replicate v1 then v2, local to local and into S3, beside rclone and aws s3 sync of the
    // origin directory itself (content-addressed packs: they too move only what is new).
    let a = work.join("packed-shards_v1");
    let (b, c) = (work.join("replica"), work.join("rclone-copy"));
    let mut rep = json!({});
    for (step, version) in [("v1", None), ("v2", Some("shards_v2"))] {
        if let Some(v) = version {
            let dir = data.join(v);
            shoal(
                &home,
                &at(a.clone()),
                &[],
                &["publish", dir.to_str().context("utf-8")?, "shards@v2"],
            )?;
        }
        let reference = format!("shards@{step}");
        let (secs, r) = shoal(
            &home,
            &at(a.clone()),
            &[],
            &["replicate", &reference, "--to", &at(b.clone())],
        )?;
        let (s3_secs, s3) = shoal(
            &home,
            &at(a.clone()),
            &m.env,
            &["replicate", &reference, "--to", "s3://bench/replica"],
        )?;
        let mut row = json!({
            "shoal_local_seconds": secs,
            "shoal_local_bytes_written": r["bytes_written"],
            "shoal_local_packs_copied": r["packs_copied"],
            "shoal_s3_seconds": s3_secs,
            "shoal_s3_bytes_written": s3["bytes_written"],
        });
        if peers {
            let (rs, rb) = rclone_sync(&a, &c)?;
            let (ss, sb) = aws_sync(&m, &a, "s3://bench/aws-copy")?;
            row["rclone_sync_seconds"] = json!(rs);
            row["rclone_sync_bytes"] = json!(rb);
            row["aws_s3_sync_seconds"] = json!(ss);
            row["aws_s3_sync_bytes"] = json!(sb);
        }
        rep[step] = row;
    }
    out["replicate_shards"] = rep;

    // Where a copy reads: a node holding the version copies from its store; an in-place
    // version's source bytes copied into a pack at the target (`--copy-sources`), beside
    // rclone copying the same source directory.
    let puller = work.join("puller");
    let (_, key) = shoal(&home, &at(a.clone()), &[], &["key"])?;
    let key = key["public_key"].as_str().context("shoal key")?.to_string();
    shoal(&puller, &at(a.clone()), &[], &["trust", &key])?;
    shoal(
        &puller,
        &at(a.clone()),
        &[],
        &["pull", "shards@v1", "--no-files"],
    )?;
    let (secs, r) = shoal(
        &puller,
        &at(a.clone()),
        &[],
        &[
            "replicate",
            "shards@v1",
            "--to",
            &at(work.join("from-store")),
        ],
    )?;
    out["replicate_from_store"] = json!({
        "seconds": secs,
        "pack_bytes_copied": r["pack_bytes_copied"],
        "bytes_local": r["bytes_local"],
        "origins": r["origins"],
    });
    let in_place = work.join("in_place-shards_v1");
    let (secs, r) = shoal(
        &home,
        &at(in_place),
        &[],
        &[
            "replicate",
            "shards@v1",
            "--to",
            &at(work.join("sources-copied")),
            "--copy-sources",
        ],
    )?;
    let mut row = json!({
        "seconds": secs,
        "pack_bytes_copied": r["pack_bytes_copied"],
        "sources_copied": r["sources_copied"],
        "bytes_written": r["bytes_written"],
        "dataset_bytes": du(&shards),
    });
    if peers {
        let (rs, rb) = rclone_sync(&shards, &work.join("rclone-shards"))?;
        row["rclone_sync_seconds"] = json!(rs);
        row["rclone_sync_bytes"] = json!(rb);
        row["seconds_over_rclone"] = json!(secs / rs);
    }
    out["replicate_copy_sources"] = row;
    drop(m);
    let _ = std::fs::remove_dir_all(&work);
    Ok(out)
}
