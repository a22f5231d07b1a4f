//! The deployment commands with the real binary: `hangar health` (the image's HEALTHCHECK)
//! answers 0 for a live server and 1 otherwise; `hangar bundle` writes a tarball whose
//! `install.sh` installs a working binary and refuses a damaged bundle before installing
//! anything. The image, Compose and the no-route namespace are `scripts/deploy-test.sh`.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn hangar(args: &[&str]) -> Output {
    Command::new(bin()).args(args).env_remove("HANGAR_URL").env_remove("API_PORT").output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn health_exits_0_for_a_live_server_and_1_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), &[("ENABLED_MODULES", "api")]);
    let o = hangar(&["health", "--url", &s.url]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("OK"), "{}", text(&o));
    // The listener from API_PORT when no URL is given, as inside the container.
    let port = s.url.rsplit(':').next().unwrap().to_string();
    let o = Command::new(bin())
        .args(["health"])
        .env_remove("HANGAR_URL")
        .env("API_HOST", "127.0.0.1")
        .env("API_PORT", &port)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));

    s.kill9();
    let o = hangar(&["health", "--url", &s.url, "--timeout", "2s"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("no answer"), "{}", text(&o));
    let o = hangar(&["health", "--url", &s.url, "--timeout", "soon"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("--timeout"), "{}", text(&o));
}

/// A server run from `binary` on a free loopback port; killed on drop.
struct Served(String, std::process::Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.1.kill();
        let _ = self.1.wait();
    }
}

fn serve(binary: &Path, data: &Path) -> Served {
    use std::io::BufRead;
    let mut child = Command::new(binary)
        .args(["serve", "--port", "0", "--set", "API_HOST=127.0.0.1", "--set", "ENABLED_MODULES=api", "--data-dir"])
        .arg(data)
        .env("ROOT_PASSWORD", ROOT_PASSWORD)
        .env_remove("HANGAR_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.trim().strip_prefix("listening on ") {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    let url = rx.recv_timeout(std::time::Duration::from_secs(60));
    let served = Served(url.clone().unwrap_or_default(), child);
    assert!(url.is_ok(), "the installed binary did not announce a listener");
    served
}

fn install(top: &Path, prefix: &Path) -> Output {
    Command::new(top.join("install.sh")).arg("--prefix").arg(prefix).arg("--no-image").output().unwrap()
}

#[test]
fn a_bundle_installs_a_working_binary_and_a_damaged_one_installs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("image.tar");
    std::fs::write(&image, b"not really an image, install.sh --no-image leaves it").unwrap();
    let chart = d.join("chart");
    std::fs::create_dir_all(chart.join("templates")).unwrap();
    std::fs::write(chart.join("Chart.yaml"), "apiVersion: v2\nname: hangar\nversion: 0.1.0\n").unwrap();
    let out = d.join("bundle.tar");
    let o = hangar(&[
        "--output",
        "json",
        "bundle",
        "--out",
        out.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--chart",
        chart.to_str().unwrap(),
        "--compose",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/compose/docker-compose.yml"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let top = v["top"].as_str().unwrap().to_string();

    for (name, damage) in [("good", false), ("damaged", true)] {
        let unpack = d.join(name);
        std::fs::create_dir_all(&unpack).unwrap();
        let st = Command::new("tar").arg("-xf").arg(&out).arg("-C").arg(&unpack).status().unwrap();
        assert!(st.success());
        let top = unpack.join(&top);
        if damage {
            let f = top.join("helm/hangar/Chart.yaml");
            let mut t = std::fs::read_to_string(&f).unwrap();
            t.push_str("# changed\n");
            std::fs::write(&f, t).unwrap();
        }
        let prefix = d.join(format!("{name}-prefix"));
        let o = install(&top, &prefix);
        let installed = prefix.join("bin/hangar");
        if damage {
            assert!(!o.status.success(), "{}", text(&o));
            assert!(text(&o).contains("checksum mismatch") && text(&o).contains("Chart.yaml"), "{}", text(&o));
            assert!(!installed.exists(), "nothing is installed from a damaged bundle");
            continue;
        }
        assert!(o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("docker load -i"), "the image is left for later: {}", text(&o));
        assert!(prefix.join("share/hangar/compose/docker-compose.yml").is_file());
        assert!(prefix.join("share/hangar/helm/hangar/Chart.yaml").is_file());
        let o = Command::new(&installed).arg("--version").output().unwrap();
        assert!(o.status.success() && text(&o).starts_with("hangar "), "{}", text(&o));
        // The installed binary serves, and answers its own liveness check.
        let url = serve(&installed, &d.join("data"));
        let o = Command::new(&installed).args(["health", "--url", &url.0]).output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
    }
}
