//! `hangar version [--check]`, `hangar completion SHELL` and `hangar man`: what an operator
//! needs to keep the CLI and the servers on the same version and to use the CLI comfortably.
//! Completions and the man page are generated from the same clap command tree that parses
//! the command line, so they never disagree with it.

use std::cmp::Ordering;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::client::Client;
use crate::output::{Output, print};

/// This binary's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The numeric `major.minor.patch` of a version text (`v1.2.3-rc1` -> `[1, 2, 3]`); `None`
/// when it does not start with numbers.
fn numbers(v: &str) -> Option<Vec<u64>> {
    let core = v.trim().trim_start_matches('v');
    let core = core.split(['-', '+']).next().unwrap_or_default();
    let parts: Option<Vec<u64>> = core.split('.').map(|p| p.parse().ok()).collect();
    parts.filter(|p| !p.is_empty())
}

/// What to upgrade, given the CLI's and the server's versions.
pub fn advice(cli: &str, server: &str) -> (&'static str, String) {
    if cli.trim() == server.trim() {
        return ("same", "the CLI and the server run the same version".into());
    }
    match (numbers(cli), numbers(server)) {
        (Some(c), Some(s)) => match c.cmp(&s) {
            Ordering::Less => {
                ("upgrade-cli", format!("the CLI ({cli}) is older than the server ({server}): upgrade the CLI"))
            }
            Ordering::Greater => {
                ("upgrade-server", format!("the server ({server}) is older than the CLI ({cli}): upgrade the server"))
            }
            // Same numbers, different suffix (a pre-release or a build tag).
            Ordering::Equal => ("differ", format!("the CLI ({cli}) and the server ({server}) are different builds")),
        },
        _ => ("differ", format!("the CLI ({cli}) and the server ({server}) differ")),
    }
}

/// `hangar version [--check]`.
pub async fn version(check: bool, url_flag: Option<&str>, out: Output) -> Result<()> {
    if !check {
        print(out, &json!({"cli": VERSION}), &["cli"]);
        return Ok(());
    }
    let c = Client::connect(url_flag)?;
    let v = c
        .get("/version")
        .await
        .with_context(|| format!("cannot read the server's version from {}/version", c.base()))?;
    let server =
        v.get("version").and_then(|s| s.as_str()).context("the server's /version answer has no version")?.to_string();
    let (status, message) = advice(VERSION, &server);
    print(
        out,
        &json!({"cli": VERSION, "server": server, "status": status, "advice": message}),
        &["cli", "server", "status", "advice"],
    );
    if status != "same" {
        bail!("{message}");
    }
    Ok(())
}

/// `hangar completion SHELL`: the completion script on standard output.
pub fn completion(shell: clap_complete::Shell, mut cmd: clap::Command) -> Result<()> {
    // Into memory first: clap_complete panics on a failed write (a closed pipe).
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, "hangar", &mut buf);
    use std::io::Write;
    std::io::stdout().write_all(&buf).context("cannot write the completion script")?;
    Ok(())
}

/// `hangar man [--dir DIR]`: the man page of `hangar` on standard output, or with a folder
/// one page per command (`hangar.1`, `hangar-serve.1`, `hangar-service-install.1`, ...).
pub fn man(cmd: clap::Command, dir: Option<&Path>) -> Result<()> {
    let cmd = cmd.version(VERSION);
    match dir {
        None => {
            let mut buf = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut buf).context("cannot render the man page")?;
            use std::io::Write;
            std::io::stdout().write_all(&buf)?;
        }
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            clap_mangen::generate_to(cmd, d)
                .with_context(|| format!("cannot write the man pages into {}", d.display()))?;
            let mut pages: Vec<String> = std::fs::read_dir(d)?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "1"))
                .map(|p| p.display().to_string())
                .collect();
            pages.sort();
            for p in pages {
                println!("{p}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::advice;

    #[test]
    fn the_advice_names_what_to_upgrade() {
        assert_eq!(advice("0.1.0", "0.1.0").0, "same");
        assert_eq!(advice("0.1.0", "0.2.0").0, "upgrade-cli");
        assert_eq!(advice("1.10.0", "1.9.3").0, "upgrade-server");
        assert_eq!(advice("v1.2.3", "1.2.4").0, "upgrade-cli");
        assert_eq!(advice("1.2.3-rc1", "1.2.3").0, "differ");
        assert_eq!(advice("1.2.3", "main").0, "differ");
    }
}
