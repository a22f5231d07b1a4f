//! PDFiles written as the reference's docs write them, run by the real CLI against a real
//! server: `hangar catalog list FILE`, `hangar catalog run FILE`, and `hangar pull FILE
//! --host URL`, which does what the reference's pull does (the VM is created on the host
//! under MACHINE_NAME for OWNER, cloned, started, and the EXECUTE lines run in the clone).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{Auth, FakeParallels, ROOT_PASSWORD, Server, bin, call, client, login};
use reqwest::Method;
use serde_json::Value;

/// `hangar --output json ARGS` with the given environment: (success, stdout JSON, stderr).
fn cli(home: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, Value, String) {
    let mut cmd = Command::new(bin());
    cmd.args(["--output", "json"]).args(args);
    for v in ["HANGAR_API_KEY", "HANGAR_URL", "HANGAR_CATALOG_PROVIDER", "HANGAR_TOKEN"] {
        cmd.env_remove(v);
    }
    cmd.env("HANGAR_CONFIG_DIR", home.join("cli-config")).env("XDG_CACHE_HOME", home.join("cli-cache"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (
        out.status.success(),
        serde_json::from_str(&stdout).unwrap_or(Value::String(stdout)),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fake Parallels host whose catalog holds `golden` 1.0.0 (pushed with a PDFile).
async fn host_with_golden(dir: &Path, settings: &[(&str, &str)]) -> (FakeParallels, Server, String) {
    let fake = FakeParallels::new(dir);
    let s = fake.server(&dir.join("data"), settings);
    let root = login(&client(), &s, "root", ROOT_PASSWORD).await;
    let push = dir.join("push.pdfile");
    std::fs::write(
        &push,
        format!(
            "# push the golden image\nTO {url}\nAUTHENTICATE USERNAME root\nAUTHENTICATE PASSWORD {{{{ .Env.PD_PASSWORD }}}}\n\
             PROVIDER NAME local-storage\nPROVIDER CATALOG_PATH {store}\nCATALOG_ID golden\nVERSION 1.0.0\n\
             ARCHITECTURE amd64\nVM_TYPE pvm\nLOCAL_PATH {bundle}\nCOMPRESS_PACK true\nCOMPRESS_PACK_LEVEL best_speed\n",
            url = s.url,
            store = dir.join("store").display(),
            bundle = fake.images.join("golden.pvm").display()
        ),
    )
    .unwrap();
    let (ok, v, err) = cli(dir, &["push", push.to_str().unwrap()], &[("PD_PASSWORD", ROOT_PASSWORD)]);
    assert!(ok, "push: {err}");
    assert_eq!(v["type"], "pvm", "VM_TYPE sets the type: {v}");
    assert!(err.contains("COMPRESS_PACK_LEVEL is accepted and not used"), "{err}");
    (fake, s, root)
}

#[tokio::test]
async fn catalog_list_and_run_read_the_catalog_the_pdfile_names() {
    let dir = tempfile::tempdir().unwrap();
    let (_fake, s, _root) = host_with_golden(dir.path(), &[]).await;
    let list = dir.path().join("list.pdfile");
    std::fs::write(
        &list,
        format!(
            "# list the catalog\n// as the docs write it\nFROM {url}\nINSECURE true\nAUTHENTICATE USERNAME {{{{ USER_NAME }}}}\n\
             AUTHENTICATE PASSWORD {{{{ .Env.PD_PASSWORD }}}}\nCLIENT eyJjbGllbnQiOiJjaSJ9\n\nRUN list\n",
            url = s.url
        ),
    )
    .unwrap();
    let env = [("PD_PASSWORD", ROOT_PASSWORD), ("USER_NAME", "root")];
    // No token, no saved login: the PDFile's credentials are what let the CLI in.
    let (ok, v, err) = cli(dir.path(), &["catalog", "list", list.to_str().unwrap()], &env);
    assert!(ok, "{err}");
    assert_eq!(v[0]["golden"][0]["version"], "1.0.0", "{v}");
    assert!(err.contains("CLIENT is accepted and not used"), "{err}");
    let (ok, v2, err) = cli(dir.path(), &["catalog", "run", list.to_str().unwrap()], &env);
    assert!(ok, "{err}");
    assert_eq!(v2, v);
    // Wrong credentials are refused by the server, not ignored.
    let (ok, _, err) = cli(
        dir.path(),
        &["catalog", "list", list.to_str().unwrap()],
        &[("PD_PASSWORD", "nope"), ("USER_NAME", "root")],
    );
    assert!(!ok && err.contains("401"), "{err}");
    // An unknown directive names its line; an unset placeholder names the variable.
    std::fs::write(&list, format!("FROM {}\nCATALOG_ID x\nCLONE_TO other\n", s.url)).unwrap();
    let (ok, _, err) = cli(dir.path(), &["catalog", "run", list.to_str().unwrap()], &[]);
    assert!(!ok && err.contains("line 3") && err.contains("unknown directive CLONE_TO"), "{err}");
    std::fs::write(&list, "FROM {{ .Env.NO_SUCH_VAR }}\n").unwrap();
    let (ok, _, err) = cli(dir.path(), &["catalog", "list", list.to_str().unwrap()], &[]);
    assert!(!ok && err.contains("NO_SUCH_VAR"), "{err}");
}

#[tokio::test]
async fn pull_file_creates_clones_starts_and_executes_on_the_host() {
    let dir = tempfile::tempdir().unwrap();
    // The host image cache lives where CATALOG_CACHE_FOLDER says.
    let cache = dir.path().join("host-cache");
    let (_fake, s, root) = host_with_golden(dir.path(), &[("CATALOG_CACHE_FOLDER", cache.to_str().unwrap())]).await;
    let marker = dir.path().join("executed-in-the-clone");
    let pull = dir.path().join("pull.pdfile");
    std::fs::write(
        &pull,
        format!(
            "FROM {url}\nAUTHENTICATE USERNAME root\nAUTHENTICATE PASSWORD {{{{ .Env.PD_PASSWORD }}}}\n\
             CATALOG_ID golden\nVERSION latest\nARCHITECTURE amd64\nMACHINE_NAME placeholder\nOWNER root\n\
             CLONE ci-run-1\nSTART_AFTER_PULL true\nEXECUTE echo first\nEXECUTE touch {marker}\n",
            url = s.url,
            marker = marker.display()
        ),
    )
    .unwrap();
    // The host is this server; --machine-name overrides MACHINE_NAME as the reference's flag.
    let (ok, v, err) = cli(
        dir.path(),
        &["pull", pull.to_str().unwrap(), "--host", &s.url, "--machine-name", "ci-base"],
        &[("PD_PASSWORD", ROOT_PASSWORD), ("HANGAR_TOKEN", &root)],
    );
    assert!(ok, "pull: {err}");
    assert_eq!(v["machine_name"], "ci-base", "{v}");
    assert_eq!(v["clone_name"], "ci-run-1", "{v}");
    assert_eq!(v["executed"][0]["stdout"].as_str().unwrap().trim(), "first", "{v}");
    assert!(marker.exists(), "the EXECUTE line did not run");
    assert!(cache.join("images/golden").is_dir(), "the image was not cached in CATALOG_CACHE_FOLDER");
    let c = client();
    let ra = Auth::Bearer(root.clone());
    let (st, list) = call(&c, Method::GET, &s.api("/machines"), &ra, None, &[]).await;
    assert_eq!(st, 200);
    let names: Vec<&str> = list.as_array().unwrap().iter().filter_map(|m| m["Name"].as_str()).collect();
    assert!(names.contains(&"ci-base") && names.contains(&"ci-run-1"), "{names:?}");
    assert!(!names.contains(&"placeholder"), "{names:?}");
    let (_, base_vm) = call(&c, Method::GET, &s.api("/machines/ci-base"), &ra, None, &[]).await;
    // On a Parallels host OWNER is also the macOS account that runs the VM (the fake host has
    // no other account than the server's, so the test names root).
    assert_eq!(base_vm["owner"], "root", "OWNER: {base_vm}");
    let (_, clone) = call(&c, Method::GET, &s.api("/machines/ci-run-1/status"), &ra, None, &[]).await;
    assert_eq!(clone["status"], "running", "START_AFTER_PULL starts the clone: {clone}");
    let (_, base) = call(&c, Method::GET, &s.api("/machines/ci-base/status"), &ra, None, &[]).await;
    assert_ne!(base["status"], "running", "with CLONE the pulled VM itself is not started: {base}");

    // A failing EXECUTE is an error naming the command (`hangar catalog pull FILE` is the same).
    std::fs::write(
        &pull,
        format!("FROM {url}\nCATALOG_ID golden\nMACHINE_NAME ci-fail\nEXECUTE exit 3\n", url = s.url),
    )
    .unwrap();
    let (ok, _, err) =
        cli(dir.path(), &["catalog", "pull", pull.to_str().unwrap(), "--host", &s.url], &[("HANGAR_TOKEN", &root)]);
    assert!(!ok && err.contains("\"exit 3\"") && err.contains("exited with 3"), "{err}");
}
