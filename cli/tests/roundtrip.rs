//! Publish and pull through the real binary on the embedded default (local origin).

mod common;
use common::*;

#[test]
fn publish_then_pull_into_fresh_state_reproduces_everything() {
    let env = Env::new();
    let src = env.path("src");
    sample_tree(&src);
    let p = env.json(&[
        "publish",
        src.to_str().unwrap(),
        "demo@v1",
        "--tag",
        "latest",
    ]);
    for field in [
        "ref",
        "root",
        "files",
        "bytes",
        "chunks",
        "new_chunks",
        "new_bytes_uploaded",
        "seconds",
    ] {
        assert!(p.get(field).is_some(), "publish --json lacks {field}: {p}");
    }
    assert_eq!(p["ref"], "demo@v1");
    assert_eq!(p["files"], 25);
    assert_eq!(
        p["chunks"].as_u64(),
        p["new_chunks"].as_u64(),
        "first publish: every chunk is new"
    );
    let root = p["root"].as_str().unwrap().to_string();

    // Another machine: fresh state dir, same origin, trusts the publisher.
    let other = env.peer("other");
    assert!(other.run(&["trust", &env.key()]).status.success());
    let dest = env.path("out");
    let r = other.json(&["pull", "demo@v1", "--to", dest.to_str().unwrap()]);
    for field in [
        "ref",
        "root",
        "files",
        "bytes",
        "bytes_from_origin",
        "bytes_from_peers",
        "bytes_already_local",
        "seconds",
    ] {
        assert!(r.get(field).is_some(), "pull --json lacks {field}: {r}");
    }
    assert_eq!(r["root"], root.as_str());
    assert_eq!(r["bytes_already_local"], 0);
    assert!(r["bytes_from_origin"].as_u64().unwrap() >= r["bytes"].as_u64().unwrap());
    assert_same_tree(&src, &dest);

    // Everything is local now: a second pull transfers nothing, by tag and by root id.
    let dest2 = env.path("out2");
    let again = other.json(&["pull", "demo@latest", "--to", dest2.to_str().unwrap()]);
    assert_eq!(again["bytes_from_origin"], 0);
    assert_eq!(again["bytes_already_local"], r["bytes"]);
    assert_same_tree(&src, &dest2);
    let by_root = other.json(&[
        "pull",
        &format!("demo@{root}"),
        "--to",
        dest2.to_str().unwrap(),
    ]);
    assert_eq!(by_root["version"], "demo@v1");
    assert_eq!(by_root["bytes_from_origin"], 0);
    assert_same_tree(&src, &dest2);
}

#[test]
fn publishing_an_existing_version_fails_and_changes_nothing() {
    let env = Env::new();
    let src = env.path("src");
    sample_tree(&src);
    env.json(&["publish", src.to_str().unwrap(), "demo@v1"]);
    let before = all_paths(std::path::Path::new(&env.origin));
    write(&src.join("new.txt"), b"changed");
    let err = env.fails(&["publish", src.to_str().unwrap(), "demo@v1"]);
    assert!(err.contains("version demo@v1 already exists"), "{err}");
    assert_eq!(all_paths(std::path::Path::new(&env.origin)), before);
}

#[test]
fn versions_ls_tag_and_diff() {
    let env = Env::new();
    let src = env.path("src");
    sample_tree(&src);
    env.json(&["publish", src.to_str().unwrap(), "org/demo@v1"]);
    write(&src.join("many/f03"), b"rewritten");
    std::fs::remove_file(src.join("many/f04")).unwrap();
    write(&src.join("added/new.bin"), &random_bytes(9, 5000));
    env.json(&[
        "publish",
        src.to_str().unwrap(),
        "org/demo@v2",
        "--tag",
        "latest",
    ]);

    let v = env.json(&["versions", "org/demo"]);
    let names: Vec<&str> = v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["version"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["v1", "v2"]);
    assert_eq!(v["versions"][1]["tags"][0], "latest");
    assert_eq!(v["versions"][1]["trusted"], true);

    env.json(&["tag", "org/demo@v1", "stable"]);
    let ls = env.json(&["ls", "org/demo@stable", "a"]);
    let entries = strs(&ls["entries"], "name");
    assert_eq!(entries, ["b", "link", "readonly.dat", "run.sh"]);
    let file = env.json(&["ls", "org/demo@v1", "a/run.sh"]);
    assert_eq!(file["entries"][0]["mode"], "755");
    assert!(env
        .fails(&["ls", "org/demo@v1", "nope"])
        .contains("no '/nope' in org/demo@v1"));

    let d = env.json(&["diff", "org/demo@v1", "org/demo@latest"]);
    assert_eq!(d["added_files"], 1);
    assert_eq!(d["removed_files"], 1);
    assert_eq!(d["changed_files"], 1);
    assert_eq!(d["changed_bytes"], 9);
    let paths = strs(&d["entries"], "path");
    assert_eq!(paths, ["added", "many/f03", "many/f04"]);
    // Only the root, `many` and nothing else was read: unchanged subtrees are skipped by id.
    assert_eq!(d["nodes_read"], 4);
}

#[test]
fn malformed_references_and_names_are_refused() {
    let env = Env::new();
    for (bad, why) in [
        ("imagenet@", "missing version"),
        ("@v1", "missing dataset name"),
        ("a@b@c", "more than one '@'"),
        ("Imagenet@v1", "lowercase"),
        ("x@b3:1234", "64 hex digits"),
    ] {
        let err = env.fails(&["pull", bad]);
        assert!(err.contains(why), "{bad}: {err}");
        assert_eq!(err.lines().count(), 1, "one-line error: {err}");
    }
    let src = env.path("src");
    sample_tree(&src);
    assert!(env
        .fails(&["publish", src.to_str().unwrap(), "demo@b3:00"])
        .contains("root ids"));
    assert!(env
        .fails(&["pull", "demo@v1"])
        .contains("does not exist (nothing was published there yet"));
    env.json(&["publish", src.to_str().unwrap(), "demo@v1"]);
    let err = env.fails(&["pull", "demo@v9"]);
    assert!(
        err.contains("version or tag demo@v9 not found in origin"),
        "{err}"
    );
}

#[test]
fn bad_sources_are_refused_with_the_path() {
    let env = Env::new();
    let missing = env.path("missing");
    let err = env.fails(&["publish", missing.to_str().unwrap(), "demo@v1"]);
    assert!(
        err.contains(missing.to_str().unwrap()) && err.contains("No such file"),
        "{err}"
    );

    let fifo_dir = env.path("fifo");
    std::fs::create_dir_all(&fifo_dir).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(fifo_dir.join("pipe"))
        .status()
        .unwrap();
    assert!(status.success());
    let err = env.fails(&["publish", fifo_dir.to_str().unwrap(), "demo@v1"]);
    assert!(err.contains("pipe") && err.contains("is a FIFO"), "{err}");

    let escape = env.path("escape");
    std::fs::create_dir_all(&escape).unwrap();
    std::os::unix::fs::symlink("../../etc/passwd", escape.join("evil")).unwrap();
    let err = env.fails(&["publish", escape.to_str().unwrap(), "demo@v1"]);
    assert!(
        err.contains("evil") && err.contains("outside the dataset"),
        "{err}"
    );

    let nonutf = env.path("nonutf");
    std::fs::create_dir_all(&nonutf).unwrap();
    use std::os::unix::ffi::OsStrExt;
    std::fs::write(
        nonutf.join(std::ffi::OsStr::from_bytes(b"bad\xffname")),
        b"x",
    )
    .unwrap();
    let err = env.fails(&["publish", nonutf.to_str().unwrap(), "demo@v1"]);
    assert!(err.contains("not valid UTF-8"), "{err}");

    // None of the failed publishes left a version behind.
    let v = env.json(&["versions", "demo"]);
    assert_eq!(v["versions"].as_array().unwrap().len(), 0);
}

#[test]
fn unreachable_origins_fail_quickly_and_clearly() {
    let env = Env::new();
    let err = env.fails(&["--origin", "http://127.0.0.1:9/shoal", "pull", "demo@v1"]);
    assert!(err.contains("http://127.0.0.1:9/shoal"), "{err}");
    let err = env.fails(&["--origin", "/nonexistent/origin", "pull", "demo@v1"]);
    assert!(err.contains("/nonexistent/origin does not exist"), "{err}");
    let err = env.fails(&["--origin", "ftp://x/y", "pull", "demo@v1"]);
    assert!(err.contains("unsupported scheme"), "{err}");
}

/// `[rates] origin` holds a command run without a daemon too; a bad rate is one line naming
/// the key and the file.
#[test]
fn config_file_rates_hold_a_pull_without_a_daemon() {
    let env = Env::new();
    let src = env.path("src");
    write(&src.join("big"), &random_bytes(7, 6_000_000));
    env.json(&["publish", src.to_str().unwrap(), "demo@v1"]);
    let other = env.peer("other");
    std::fs::create_dir_all(&other.home).unwrap();
    let config = other.home.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "trusted_keys = [{:?}]\n[rates]\norigin = \"2MB/s\"\n",
            env.key()
        ),
    )
    .unwrap();
    let t = std::time::Instant::now();
    let r = other.json(&["pull", "demo@v1", "--no-files"]);
    let secs = t.elapsed().as_secs_f64();
    let moved = r["bytes_from_origin"].as_u64().unwrap();
    assert!(moved >= 6_000_000, "{r}");
    // The rate, its 100 ms bucket, 5 %: 6 MB take at least 2.7 s.
    assert!(
        moved as f64 <= 2e6 * (secs + 0.1) * 1.05 + 65536.0,
        "{moved} bytes in {secs:.2} s, over 2 MB/s"
    );

    std::fs::write(&config, "[rates]\nupload = \"lots\"\n").unwrap();
    let err = other.fails(&["versions", "demo"]);
    assert!(
        err.contains("[rates] upload in ")
            && err.contains("config.toml \"lots\": expected bytes per second"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn config_file_sets_origin_and_trusted_keys() {
    let env = Env::new();
    let src = env.path("src");
    sample_tree(&src);
    env.json(&["publish", src.to_str().unwrap(), "demo@v1"]);
    let other = env.peer("other");
    std::fs::create_dir_all(&other.home).unwrap();
    std::fs::write(
        other.home.join("config.toml"),
        format!(
            "origin = {:?}\ntrusted_keys = [{:?}]\n",
            env.origin,
            env.key()
        ),
    )
    .unwrap();
    let out = other
        .cmd(&["--json", "pull", "demo@v1", "--no-files"])
        .env_remove("SHOAL_ORIGIN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And the environment variable works as well as the file.
    let third = env.peer("third");
    let out = third
        .cmd(&["pull", "demo@v1", "--no-files"])
        .env("SHOAL_TRUSTED_KEYS", env.key())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn completions_complete_in_a_real_shell_and_man_pages_render() {
    let env = Env::new();
    // bash, loading the script as a user's profile would, completes a command and a flag.
    let script = env.run(&["completions", "bash"]);
    assert!(script.status.success());
    let path = env.path("shoal.bash");
    std::fs::write(&path, &script.stdout).unwrap();
    let complete = |words: &str| {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=({words}); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 )); \
                 COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}; _shoal shoal \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
                 printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                path.display()
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let got = complete("shoal rep");
    assert_eq!(got.trim(), "replicate", "{got}");
    let got = complete("shoal pull --inc");
    assert_eq!(got.trim(), "--include", "{got}");
    for shell in ["zsh", "fish"] {
        let out = env.run(&["completions", shell]);
        assert!(out.status.success() && out.stdout.len() > 1000, "{shell}");
    }

    // Man pages: one per command, rendered by man itself with the flags' help.
    let dir = env.path("man1");
    let r = env.json(&["man", dir.to_str().unwrap()]);
    assert!(r["pages"].as_u64().unwrap() >= 20, "{r}");
    let out = std::process::Command::new("man")
        .arg("-l")
        .arg(dir.join("shoal-pull.1"))
        .env("MANWIDTH", "100")
        .env("MANPAGER", "cat")
        .output()
        .unwrap();
    // Justified: words joined by runs of spaces.
    let text = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        out.status.success()
            && text.contains("--include <GLOB>")
            && text.contains("Only files matching this glob"),
        "{text}"
    );
}

/// The publisher of `tests/fixtures/format-v1` (see its README).
const V1_PUBLISHER: &str =
    "ed25519:7b13513cf5e44c5d64ea685adcea1513f0516a148cbe67ab1280d9eccab1d518";

/// A dataset whose first version was published in format v1 (by the release before v2, kept
/// as a fixture) stays pullable and listable; versions published on top are v2, and diff
/// between the two formats reports only real changes. In v2 a change in a directory of
/// 20,000 files uploads its path in the directory's tree, not the directory.
#[test]
fn format_v1_versions_stay_readable_next_to_v2() {
    let env = Env::new();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-v1");
    let cp = std::process::Command::new("cp")
        .args(["-a"])
        .arg(fixture.join("origin"))
        .arg(&env.origin)
        .status()
        .unwrap();
    assert!(cp.success());
    assert!(env.run(&["trust", V1_PUBLISHER]).status.success());
    let v1_src = fixture.join("src");
    let out = env.path("v1");
    env.json(&["pull", "fmt@v1", "--to", out.to_str().unwrap()]);
    assert_same_tree(&v1_src, &out);
    let ls = env.json(&["ls", "fmt@latest", "sub"]);
    let names = strs(&ls["entries"], "name");
    assert_eq!(names, ["b.bin", "deep"]);
    assert_eq!(ls["entries"][0]["chunks"], 32, "{ls}");

    // v2 on top: one file changed, a wide directory added.
    let src = env.path("src");
    let cp = std::process::Command::new("cp")
        .args(["-a"])
        .arg(&v1_src)
        .arg(&src)
        .status()
        .unwrap();
    assert!(cp.success());
    write(&src.join("many/f05"), b"changed in v2\n");
    for i in 0..20_000 {
        write(
            &src.join(format!("wide/img_{i:05}.txt")),
            format!("image {i}\n").as_bytes(),
        );
    }
    env.json(&["publish", src.to_str().unwrap(), "fmt@v2"]);
    let d = env.json(&["diff", "fmt@v1", "fmt@v2"]);
    assert_eq!(d["changed_files"], 1, "{d}");
    assert_eq!(d["added_files"], 20_000, "{d}");
    assert_eq!(d["removed_files"], 0, "{d}");
    let paths = strs(&d["entries"], "path");
    assert_eq!(
        paths,
        ["many/f05", "wide"],
        "sub/b.bin moved from inline chunks to a chunk list: the same file"
    );
    let out2 = env.path("v2");
    env.json(&["pull", "fmt@v2", "--to", out2.to_str().unwrap()]);
    assert_same_tree(&src, &out2);

    // One file of the 20,000 changes: the upload is the file, its leaf and the nodes above.
    write(&src.join("wide/img_12345.txt"), b"retouched\n");
    let p = env.json(&["publish", src.to_str().unwrap(), "fmt@v3"]);
    let uploaded = p["new_bytes_uploaded"].as_u64().unwrap();
    assert!(
        uploaded < 64 << 10,
        "{uploaded} bytes uploaded for one change: {p}"
    );
    let d = env.json(&["diff", "fmt@v2", "fmt@v3"]);
    assert_eq!(d["changed_files"], 1, "{d}");
    assert_eq!(d["entries"][0]["path"], "wide/img_12345.txt", "{d}");
    let read = d["nodes_read"].as_u64().unwrap();
    assert!(read <= 8, "diff read {read} nodes: {d}");
    let out3 = env.path("v3");
    env.json(&["pull", "fmt@v3", "--to", out3.to_str().unwrap()]);
    assert_same_tree(&src, &out3);
}

/// A publish of a directory published before from this machine takes the files it finds in
/// the same state (size, mtime, ctime, inode) as they were, unread; an edit that restores the
/// file's size and mtime is still seen (its ctime moved), and `--rehash` reads everything.
#[test]
fn unchanged_files_are_not_read_again() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let src = env.path("src");
    for i in 0..200 {
        write(
            &src.join(format!("d{}/f{i:03}", i % 4)),
            &random_bytes(i, 3000 + i as usize),
        );
    }
    // Files modified within 2 s of a publish's scan are read again next time (a change in
    // the same timestamp tick would not show): let these settle.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let s = src.to_str().unwrap();
    let p = env.json(&["publish", s, "ds@v1"]);
    assert_eq!(p["files_unchanged"], 0, "{p}");
    let state = env.home.join("publish/ds.state");
    let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let p = env.json(&["publish", s, "ds@v2"]);
    assert_eq!(p["files_unchanged"], 200, "{p}");
    assert_eq!(p["new_chunks"], 0, "{p}");
    let v1 = env.json(&["versions", "ds"]);
    assert!(
        v1.to_string().contains(p["root"].as_str().unwrap()),
        "same tree: {v1}"
    );

    // Same size, mtime put back: only the ctime says it changed.
    let f = src.join("d1/f005");
    let before = std::fs::metadata(&f).unwrap();
    let reference = env.path("mtime-ref");
    let run = |args: &[&std::ffi::OsStr]| {
        let ok = std::process::Command::new(args[0])
            .args(&args[1..])
            .status()
            .unwrap();
        assert!(ok.success(), "{args:?}");
    };
    run(&[
        "cp".as_ref(),
        "--preserve=timestamps".as_ref(),
        f.as_os_str(),
        reference.as_os_str(),
    ]);
    let mut edited = std::fs::read(&f).unwrap();
    edited[0] ^= 0xff;
    std::fs::write(&f, &edited).unwrap();
    run(&[
        "touch".as_ref(),
        "-m".as_ref(),
        "-r".as_ref(),
        reference.as_os_str(),
        f.as_os_str(),
    ]);
    let after = std::fs::metadata(&f).unwrap();
    assert_eq!(
        (after.modified().unwrap(), after.len()),
        (before.modified().unwrap(), before.len())
    );
    let p = env.json(&["publish", s, "ds@v3"]);
    assert_eq!(p["files_unchanged"], 199, "{p}");
    let d = env.json(&["diff", "ds@v2", "ds@v3"]);
    assert_eq!(d["changed_files"], 1, "{d}");
    assert_eq!(d["entries"][0]["path"], "d1/f005", "{d}");
    let out = env.path("v3");
    env.json(&["pull", "ds@v3", "--to", out.to_str().unwrap()]);
    assert_same_tree(&src, &out);

    // The edited file is recent: read once more, then known again.
    let p = env.json(&["publish", s, "ds@v4", "--rehash"]);
    assert_eq!(p["files_unchanged"], 0, "{p}");
    assert_eq!(p["new_chunks"], 0, "{p}");
}
