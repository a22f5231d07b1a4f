//! Shell completions, the man page and `hangar version --check`, with the real binary: the
//! bash script loads in bash and completes subcommands, zsh and fish scripts name them, the
//! man page renders with `man -l` and names every subcommand, and `version --check` reads a
//! running server's version.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use serde_json::Value;

fn hangar(args: &[&str]) -> std::process::Output {
    Command::new(common::bin()).args(args).env_remove("HANGAR_URL").output().expect("run hangar")
}

fn stdout_of(args: &[&str]) -> String {
    let o = hangar(args);
    assert!(o.status.success(), "hangar {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

const SUBCOMMANDS: &[&str] = &["serve", "service", "version", "completion", "man", "catalog", "host", "vm", "login"];

#[test]
fn the_bash_completion_loads_and_completes_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("hangar.bash");
    std::fs::write(&script, stdout_of(&["completion", "bash"])).unwrap();
    // Load it as bash-completion would and ask what `hangar ser<TAB>` and
    // `hangar service <TAB>` complete to.
    let ask = |words: &str, cword: usize| -> String {
        let prog = format!(
            "set -e; source '{}'; complete -p hangar >/dev/null; COMP_WORDS=({words}); COMP_CWORD={cword}; \
             COMP_LINE='{words}'; COMP_POINT=${{#COMP_LINE}}; _hangar hangar \"${{COMP_WORDS[$COMP_CWORD]}}\" \"${{COMP_WORDS[$COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display()
        );
        let o = Command::new("bash").arg("-c").arg(&prog).output().unwrap();
        assert!(o.status.success(), "bash: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let got = ask("hangar ser", 1);
    let words: Vec<&str> = got.lines().collect();
    assert!(words.contains(&"serve") && words.contains(&"service"), "hangar ser<TAB>: {words:?}");
    assert!(!words.contains(&"catalog"), "{words:?}");
    let got = ask("hangar service ''", 2);
    for w in ["install", "uninstall", "status"] {
        assert!(got.lines().any(|l| l == w), "hangar service <TAB> lacks {w}: {got}");
    }
    let got = ask("hangar completion ''", 2);
    for w in ["bash", "zsh", "fish"] {
        assert!(got.lines().any(|l| l == w), "hangar completion <TAB> lacks {w}: {got}");
    }
}

#[test]
fn zsh_and_fish_completions_name_the_subcommands() {
    for shell in ["zsh", "fish"] {
        let s = stdout_of(&["completion", shell]);
        for c in SUBCOMMANDS {
            assert!(s.contains(c), "the {shell} completion does not name {c}");
        }
    }
    let fish = stdout_of(&["completion", "fish"]);
    assert!(fish.contains("complete -c hangar"), "{}", &fish[..200.min(fish.len())]);
    let o = hangar(&["completion", "tcsh"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("possible values"));
}

#[test]
fn the_man_page_renders_and_names_every_subcommand() {
    let page = stdout_of(&["man"]);
    assert!(page.contains(".TH hangar 1"), "{}", &page[..200.min(page.len())]);
    for c in SUBCOMMANDS {
        assert!(page.contains(&format!("hangar\\-{c}(1)")), "the man page does not name {c}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hangar.1");
    std::fs::write(&file, &page).unwrap();
    // man-db renders it (roff through groff) when it is installed.
    if Command::new("man").arg("--version").output().is_ok_and(|o| o.status.success()) {
        let o =
            Command::new("man").arg("-l").arg(&file).env("MANPAGER", "cat").env("MANWIDTH", "100").output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "man -l: {}", String::from_utf8_lossy(&o.stderr));
        assert!(text.contains("SYNOPSIS") && text.contains("Disposable VMs for CI"), "{text}");
    }
    // One page per command in a folder.
    let pages = dir.path().join("pages");
    let listed = stdout_of(&["man", "--dir", pages.to_str().unwrap()]);
    for f in ["hangar.1", "hangar-service.1", "hangar-service-install.1", "hangar-version.1", "hangar-completion.1"] {
        assert!(pages.join(f).is_file(), "no {f} in {listed}");
    }
    let install = std::fs::read_to_string(pages.join("hangar-service-install.1")).unwrap();
    assert!(install.contains("\\-\\-dry\\-run") && install.contains("\\-\\-role"), "{install}");
}

#[tokio::test]
async fn version_check_compares_with_the_server() {
    let v: Value = serde_json::from_str(&stdout_of(&["version", "--output", "json"])).unwrap();
    assert_eq!(v["cli"], env!("CARGO_PKG_VERSION"));

    let dir = tempfile::tempdir().unwrap();
    let s = common::Server::start(dir.path(), &[("ENABLED_MODULES", "api")]);
    let c = common::client();
    let token = common::login(&c, &s, "root", common::ROOT_PASSWORD).await;
    let run = |token: Option<&str>| {
        let mut cmd = Command::new(common::bin());
        cmd.args(["version", "--check", "--output", "json", "--url", &s.url]);
        cmd.env("HANGAR_CONFIG_DIR", dir.path()).env_remove("HANGAR_API_KEY");
        match token {
            Some(t) => cmd.env("HANGAR_TOKEN", t),
            None => cmd.env_remove("HANGAR_TOKEN"),
        };
        cmd.output().unwrap()
    };
    let o = run(Some(&token));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["server"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["status"], "same");
    // Without a login the server refuses, and the CLI says why.
    let o = run(None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("version") && !err.contains("panicked"), "{err}");
}

#[tokio::test]
async fn every_agent_reports_its_version_and_host_list_shows_whether_it_differs() {
    let dir = tempfile::tempdir().unwrap();
    let c = common::client();
    let fleet = common::one_host_fleet(&c, dir.path(), "api,orchestrator").await;
    let auth = common::Auth::Bearer(fleet.root.clone());
    let hosts = fleet.orch.api("/orchestrator/hosts");
    // The agent's version comes from its own /config/hardware, read by the orchestrator.
    common::wait_for("the agent's version on the orchestrator", std::time::Duration::from_secs(30), || async {
        let (_, v) = common::call(&c, reqwest::Method::GET, &hosts, &auth, None, &[]).await;
        v[0]["devops_version"] == env!("CARGO_PKG_VERSION")
    })
    .await;
    let (_, v) = common::call(&c, reqwest::Method::GET, &hosts, &auth, None, &[]).await;
    assert_eq!(v[0]["version_differs"], false, "the same binary runs on both: {v}");
    let o = Command::new(common::bin())
        .args(["host", "list", "--output", "json", "--url", &fleet.orch.url])
        .env("HANGAR_TOKEN", &fleet.root)
        .env("HANGAR_CONFIG_DIR", dir.path())
        .env_remove("HANGAR_API_KEY")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let listed: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(listed[0]["devops_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(listed[0]["version_differs"], false);
    let table = Command::new(common::bin())
        .args(["host", "list", "--url", &fleet.orch.url])
        .env("HANGAR_TOKEN", &fleet.root)
        .env("HANGAR_CONFIG_DIR", dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("VERSION_DIFFERS") || text.to_lowercase().contains("version_differs"), "{text}");
}
