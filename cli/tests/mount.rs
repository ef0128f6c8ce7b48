//! `shoal mount` for real: FUSE mounts of published versions, read by real programs.

mod common;
use common::*;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Publishes `src` as demo@v1 from `env`, returns a second machine that trusts it (so nothing
/// is local there yet).
fn publish_and_peer(env: &Env, src: &Path) -> Env {
    env.json(&["publish", src.to_str().unwrap(), "demo@v1"]);
    let other = env.peer("reader");
    other.json(&["trust", &env.key()]);
    other
}

fn os_err(r: std::io::Result<impl Sized>) -> i32 {
    r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
}

#[test]
fn mounted_version_reads_like_the_source_and_refuses_writes() {
    let env = Env::new();
    let src = env.path("src");
    sample_tree(&src);
    write(&src.join("large.bin"), &random_bytes(5, 24 << 20));
    let reader = publish_and_peer(&env, &src);
    let mp = env.path("mnt");
    let m = Mounted::start(&reader, "demo@v1", &mp, &[]);

    assert_same_tree(&src, &mp);
    let mut found = Command::new("find")
        .arg(".")
        .current_dir(&mp)
        .output()
        .unwrap()
        .stdout;
    let mut want = Command::new("find")
        .arg(".")
        .current_dir(&src)
        .output()
        .unwrap()
        .stdout;
    let sort = |v: &mut Vec<u8>| {
        let mut l: Vec<&str> = std::str::from_utf8(v).unwrap().lines().collect();
        l.sort();
        l.join("\n")
    };
    assert_eq!(sort(&mut found), sort(&mut want));

    // Link counts and stable inode numbers.
    let a = std::fs::metadata(mp.join("a")).unwrap();
    assert_eq!(a.nlink(), 3, "a has one subdirectory");
    assert_eq!(
        std::fs::metadata(mp.join("a/b/c.txt")).unwrap().ino(),
        std::fs::metadata(mp.join("a/b/c.txt")).unwrap().ino()
    );

    // Every write attempt gets EROFS.
    const EROFS: i32 = 30;
    assert_eq!(os_err(std::fs::File::create(mp.join("new"))), EROFS);
    assert_eq!(
        os_err(
            std::fs::OpenOptions::new()
                .write(true)
                .open(mp.join("big.bin"))
        ),
        EROFS
    );
    assert_eq!(os_err(std::fs::create_dir(mp.join("d"))), EROFS);
    assert_eq!(os_err(std::fs::remove_file(mp.join("empty"))), EROFS);
    assert_eq!(
        os_err(std::fs::rename(mp.join("empty"), mp.join("e2"))),
        EROFS
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        os_err(std::fs::set_permissions(
            mp.join("empty"),
            std::fs::Permissions::from_mode(0o777)
        )),
        EROFS
    );

    // Ioctls get ENOTTY (CPython's `open()` asks each file whether it is a terminal), and
    // nothing is logged however many: the kernel asks the mount every time.
    let py = Command::new("python3")
        .arg("-c")
        .arg(
            "import sys\nfor _ in range(50):\n    f = open(sys.argv[1], 'rb')\n    \
             assert not f.isatty() and f.read() == open(sys.argv[2], 'rb').read()\nprint('ok')",
        )
        .arg(mp.join("a/b/c.txt"))
        .arg(src.join("a/b/c.txt"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&py.stdout).trim(),
        "ok",
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let log = std::fs::read_to_string(reader.path("mount.log")).unwrap();
    assert!(!log.contains("ioctl"), "{log}");

    // tar of the whole tree.
    let out = env.path("untarred");
    std::fs::create_dir_all(&out).unwrap();
    let tar = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -C {} -cf - . | tar -C {} -xf -",
            mp.display(),
            out.display()
        ))
        .status()
        .unwrap();
    assert!(tar.success());
    assert_same_tree(&src, &out);

    let report = m.stop(&reader);
    assert!(
        report["bytes_read"].as_u64().unwrap() >= 24 << 20,
        "{report}"
    );
    assert_eq!(report["read_errors"], 0);
    assert!(!is_mounted(&mp));
}

#[test]
fn concurrent_readers_of_one_file() {
    let env = Env::new();
    let src = env.path("src");
    let data = random_bytes(11, 32 << 20);
    write(&src.join("shard.bin"), &data);
    let reader = publish_and_peer(&env, &src);
    let mp = env.path("mnt");
    let m = Mounted::start(&reader, "demo@v1", &mp, &["--prefetch", "none"]);
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let path = mp.join("shard.bin");
            let data = data.clone();
            std::thread::spawn(move || {
                let mut f = std::fs::File::open(&path).unwrap();
                let mut buf = vec![0u8; 300_000];
                for i in 0..20u64 {
                    let off = (random_bytes(t * 100 + i, 8)
                        .iter()
                        .fold(0u64, |a, b| a * 256 + *b as u64))
                        % (data.len() as u64 - buf.len() as u64);
                    f.seek(SeekFrom::Start(off)).unwrap();
                    f.read_exact(&mut buf).unwrap();
                    assert_eq!(
                        &buf[..],
                        &data[off as usize..off as usize + buf.len()],
                        "thread {t} read {i} at {off}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    m.stop(&reader);
}

/// Names of the whole-file copies under `home` (finished ones only).
fn copies(home: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(home.join("files"))
        .map(|d| {
            d.map(|e| e.unwrap().path())
                .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn wait_for_copies(home: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while copies(home).len() < n {
        assert!(
            Instant::now() < deadline,
            "{n} whole-file copies not written within 60 s: {:?}",
            copies(home)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Large files, once local, are written whole beside the store and opened in passthrough mode
/// (the kernel reads the copy; no read reaches the mount), with exact bytes. A file already
/// open through the mount keeps being opened that way until closed (the kernel refuses to mix
/// the two); a copy of the wrong size is dropped and the file read through the mount.
#[test]
fn large_files_are_read_by_the_kernel_from_whole_copies() {
    let env = Env::new();
    let src = env.path("src");
    let big: Vec<(String, Vec<u8>)> = (0..3u64)
        .map(|i| {
            (
                format!("big{i}.bin"),
                random_bytes(700 + i, (6 << 20) + 12_345),
            )
        })
        .collect();
    for (name, data) in &big {
        write(&src.join(name), data);
    }
    let small = random_bytes(799, 100_000);
    write(&src.join("small.bin"), &small);
    let reader = publish_and_peer(&env, &src);
    let mp = env.path("mnt");
    let read_all = |pass: &str| {
        for (name, data) in &big {
            let got = std::fs::read(mp.join(name)).unwrap();
            assert!(got == *data, "{pass}: {name} differs");
        }
        assert!(
            std::fs::read(mp.join("small.bin")).unwrap() == small,
            "{pass}: small.bin"
        );
    };

    // Cold: read through the mount; copies follow in the background.
    let m = Mounted::start(&reader, "demo@v1", &mp, &[]);
    let mut held = std::fs::File::open(mp.join("big0.bin")).unwrap();
    read_all("cold");
    wait_for_copies(&reader.home, 3);
    // big0 is still open through the mount: another open must work (through the mount too).
    let again = std::fs::read(mp.join("big0.bin")).unwrap();
    assert!(again == big[0].1, "second open of a file held open differs");
    let mut first = Vec::new();
    held.read_to_end(&mut first).unwrap();
    assert!(first == big[0].1, "held-open file differs");
    drop(held);
    // The kernel sends the release of that open after close returns, in the background: give
    // it a moment to reach the mount (under load it can trail the next open).
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Nobody has it open now: this open goes to the copy.
    assert!(std::fs::read(mp.join("big0.bin")).unwrap() == big[0].1);
    let report = m.stop(&reader);
    assert_eq!(report["read_errors"], 0, "{report}");
    assert_eq!(report["passthrough_opens"], 1, "{report}");

    // Warm: every large file from its copy; only the small one reaches the mount.
    let m = Mounted::start(&reader, "demo@v1", &mp, &[]);
    read_all("warm");
    let report = m.stop(&reader);
    assert_eq!(report["passthrough_opens"], 3, "{report}");
    assert!(
        report["bytes_read"].as_u64().unwrap() <= small.len() as u64,
        "large files were read through the mount: {report}"
    );

    // A copy cut short (say, a disk filled while another tool wrote it) is dropped and the
    // file served through the mount, exact; `--passthrough off` never uses copies.
    let victim = copies(&reader.home)[0].clone();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let m = Mounted::start(&reader, "demo@v1", &mp, &[]);
    read_all("truncated copy");
    let report = m.stop(&reader);
    assert_eq!(report["passthrough_opens"], 2, "{report}");
    assert_eq!(report["read_errors"], 0, "{report}");
    let m = Mounted::start(&reader, "demo@v1", &mp, &["--passthrough", "off"]);
    read_all("passthrough off");
    let report = m.stop(&reader);
    assert_eq!(report["passthrough_opens"], 0, "{report}");

    // `shoal cache` counts the copies; `shoal gc` removes them.
    let cache = reader.json(&["cache"]);
    assert_eq!(cache["whole_files"]["files"], 3, "{cache}");
    let copied: u64 = big.iter().map(|(_, d)| d.len() as u64).sum();
    assert_eq!(cache["whole_files"]["used_bytes"], copied, "{cache}");
    let gc = reader.json(&["gc"]);
    assert!(gc["freed_bytes"].as_u64().unwrap() >= copied, "{gc}");
    assert!(copies(&reader.home).is_empty());
    assert_eq!(reader.json(&["cache"])["whole_files"]["files"], 0);
}

/// Readers going through a directory in order get the files ahead of them pushed into the
/// page cache (and the rest of each small file after its first read), concurrently with their
/// own reads of the same pages: every byte stays exact, cold (fetched while read) and warm.
#[test]
fn readers_going_through_a_directory_in_order_get_exact_bytes_pushed_ahead() {
    let env = Env::new();
    let src = env.path("src");
    let mut files = Vec::new();
    for i in 0..240u64 {
        let len = 20_000 + (i as usize * 7_919) % 180_000;
        let name = format!("img{i:04}.bin");
        let data = random_bytes(1000 + i, len);
        write(&src.join("train").join(&name), &data);
        files.push((name, data));
    }
    let files = std::sync::Arc::new(files);
    let reader = publish_and_peer(&env, &src);
    let mp = env.path("mnt");
    for pass in ["cold", "warm"] {
        let m = Mounted::start(&reader, "demo@v1", &mp, &[]);
        // Three readers in name order (one starting midway), one in reverse order.
        let threads: Vec<_> = (0..4usize)
            .map(|t| {
                let dir = mp.join("train");
                let files = files.clone();
                std::thread::spawn(move || {
                    let n = files.len();
                    for k in 0..n {
                        let i = match t {
                            0 | 1 => k,
                            2 => (k + n / 2) % n,
                            _ => n - 1 - k,
                        };
                        let (name, data) = &files[i];
                        let got = std::fs::read(dir.join(name)).unwrap();
                        assert!(got == *data, "{pass}: reader {t}: {name} differs");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let report = m.stop(&reader);
        assert_eq!(report["read_errors"], 0, "{pass}: {report}");
        // Cold, files are pushed only once local (a reader reading a file whole in one request
        // leaves no rest to push): nothing to assert on the amount. Warm, the readers in order
        // get files pushed ahead.
        if pass == "warm" {
            assert!(
                report["bytes_pushed"].as_u64().unwrap() > 0,
                "{pass}: nothing pushed ahead: {report}"
            );
        }
    }
}

#[test]
fn python_reads_parquet_row_groups_at_random_through_the_mount() {
    let env = Env::new();
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let gen = "import pyarrow as pa, pyarrow.parquet as pq, sys\n\
               n = 200_000\n\
               t = pa.table({'id': pa.array(range(n), pa.int64()), 'x': pa.array([float(i) * 0.5 for i in range(n)]), 's': pa.array([f'row-{i}' for i in range(n)])})\n\
               pq.write_table(t, sys.argv[1], row_group_size=10_000)\n";
    let ok = Command::new("python3")
        .args(["-c", gen])
        .arg(src.join("t.parquet"))
        .status()
        .unwrap();
    assert!(
        ok.success(),
        "pyarrow is needed (the README's test command installs it)"
    );
    let reader = publish_and_peer(&env, &src);
    let mp = env.path("mnt");
    let m = Mounted::start(&reader, "demo@v1", &mp, &[]);
    let check = "import pyarrow.parquet as pq, random, sys\n\
                 a, b = pq.ParquetFile(sys.argv[1]), pq.ParquetFile(sys.argv[2])\n\
                 assert a.num_row_groups == b.num_row_groups == 20\n\
                 order = list(range(20)); random.Random(3).shuffle(order)\n\
                 for g in order:\n\
                 \x20   assert a.read_row_group(g).equals(b.read_row_group(g)), g\n\
                 print('ok', len(order))\n";
    let out = Command::new("python3")
        .args(["-c", check])
        .arg(mp.join("t.parquet"))
        .arg(src.join("t.parquet"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok 20");
    m.stop(&reader);
}

#[test]
fn unreachable_source_gives_eio_within_the_bound_and_recovers() {
    let env = Env::new();
    let src = env.path("src");
    for i in 0..4 {
        write(
            &src.join(format!("f{i}.bin")),
            &random_bytes(50 + i, 6 << 20),
        );
    }
    env.json(&["publish", src.to_str().unwrap(), "demo@v1"]);
    // The origin is served over HTTP by a server the test can stop and start again.
    let relay = Nginx::start(&env.origin, env.dir.path());
    let mut reader = env.peer("reader");
    reader.origin = relay.url();
    reader.json(&["trust", &env.key()]);
    let mp = env.path("mnt");
    let m = Mounted::start(
        &reader,
        "demo@v1",
        &mp,
        &["--timeout", "3", "--prefetch", "none"],
    );
    assert_eq!(
        std::fs::read(mp.join("f0.bin")).unwrap(),
        std::fs::read(src.join("f0.bin")).unwrap()
    );

    relay.stop();
    assert_eio_within(&mp.join("f1.bin"), Duration::from_secs(20));
    let log = std::fs::read_to_string(reader.path("mount.log")).unwrap_or_default()
        + &std::fs::read_to_string(env.path("mount.log")).unwrap_or_default();
    assert!(log.contains("EIO"), "the reason is logged: {log}");

    relay.restart();
    assert_eq!(
        std::fs::read(mp.join("f1.bin")).unwrap(),
        std::fs::read(src.join("f1.bin")).unwrap()
    );
    m.stop(&reader);
}

#[test]
fn sigterm_unmounts_cleanly() {
    let env = Env::new();
    let src = env.path("src");
    sample_tree(&src);
    let reader = publish_and_peer(&env, &src);
    let mp = env.path("mnt");
    let mut m = Mounted::start(&reader, "demo@v1", &mp, &[]);
    let child = m.child.take().unwrap();
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(!is_mounted(&mp), "SIGTERM must unmount");
}

#[test]
fn read_order_is_fetched_ahead_of_the_reader_not_all_at_once() {
    let env = Env::new();
    let src = env.path("src");
    for i in 0..16 {
        write(
            &src.join(format!("s/f{i:02}.bin")),
            &random_bytes(700 + i, 1 << 20),
        );
    }
    let reader = publish_and_peer(&env, &src);
    // The data loader's order for the next epoch: reversed.
    let order: Vec<String> = (0..16).rev().map(|i| format!("s/f{i:02}.bin")).collect();
    let order_file = env.path("order.txt");
    std::fs::write(&order_file, order.join("\n")).unwrap();
    let mp = env.path("mnt");
    let m = Mounted::start(
        &reader,
        "demo@v1",
        &mp,
        &[
            "--prefetch",
            "none",
            "--read-order",
            order_file.to_str().unwrap(),
            "--read-ahead",
            "3MiB",
        ],
    );
    // Before anything is read, the fetcher runs ahead by about the read-ahead, then waits.
    let deadline = Instant::now() + Duration::from_secs(20);
    while stored_bytes(&reader.home) < 2 << 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(800));
    let early = stored_bytes(&reader.home);
    assert!(
        (2 << 20..8 << 20).contains(&early),
        "fetched {early} bytes ahead of a reader that has not started"
    );
    // The reader follows the order; the fetcher keeps ahead of it, and every byte is right.
    for p in &order {
        assert!(
            std::fs::read(mp.join(p)).unwrap() == std::fs::read(src.join(p)).unwrap(),
            "{p}"
        );
    }
    m.stop(&reader);
    assert!(stored_bytes(&reader.home) >= 16 << 20);
}

/// Inodes the mount made for what was listed are freed when the kernel forgets them
/// (`drop_caches`), and the same paths read exactly again; a listing resumed at an offset
/// (a directory larger than one readdir reply) returns every name once.
#[test]
fn inodes_are_freed_when_the_kernel_forgets_them() {
    let env = Env::new();
    let src = env.path("src");
    for i in 0..3000 {
        write(
            &src.join(format!("d{}/f{i:04}.txt", i % 3)),
            format!("file {i}\n").as_bytes(),
        );
    }
    let reader = publish_and_peer(&env, &src);
    let mp = env.path("mnt");
    let m = Mounted::start(&reader, "demo@v1", &mp, &[]);
    // statfs reports the inodes alive as the filesystem's inode count.
    let alive = |mp: &Path| -> u64 {
        let out = Command::new("stat")
            .args(["-f", "-c", "%c"])
            .arg(mp)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let mut names: Vec<String> = std::fs::read_dir(mp.join("d1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 1000, "every name once, across readdir replies");
    assert_same_tree(&src, &mp);
    let listed = alive(&mp);
    assert!(listed > 3000, "{listed} inodes after reading everything");
    // The kernel drops its dentries and inodes, and forgets them.
    let t = Instant::now();
    let mut now = listed;
    while now > 100 && t.elapsed() < Duration::from_secs(20) {
        std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        now = alive(&mp);
    }
    assert!(
        now <= 100,
        "{now} of {listed} inodes still alive after drop_caches"
    );
    assert_same_tree(&src, &mp);
    m.stop(&reader);
}
