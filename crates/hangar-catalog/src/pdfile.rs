//! The PDFile format of the reference CLI: one `DIRECTIVE argument` per line.
//!
//! Blank lines and comments (`#` or `//` at the start of a line) are
//! ignored; directives are case-insensitive. `{{ .Env.NAME }}` and
//! `{{ NAME }}` are replaced by the environment variable `NAME` before a
//! line is parsed (an unset variable is an error, so a typo cannot silently
//! push to the wrong place). Every error names its line.
//!
//! | Directive | Argument |
//! |---|---|
//! | `FROM url` / `TO url` | catalog server to pull from / push to (`http(s)://[user:pass@]host[:port]`, or the reference's `host=...` form); implies the `pull` / `push` command |
//! | `INSECURE true\|false` | allow plain HTTP and self-signed certificates |
//! | `AUTHENTICATE USERNAME x` / `PASSWORD y` / `API_KEY z` | credentials for the catalog server |
//! | `PROVIDER <connection string>` | storage provider (`provider=aws-s3;bucket=...`) |
//! | `PROVIDER NAME x` then `PROVIDER KEY value` lines | the same, one key per line |
//! | `CATALOG_ID id`, `VERSION v`, `ARCHITECTURE a` | entry identity (architecture aliases accepted) |
//! | `DESCRIPTION text`, `TAG a,b`, `ROLE r`, `CLAIM c` | metadata and access rules (repeatable lists) |
//! | `LOCAL_PATH dir` | push source |
//! | `DESTINATION dir`, `MACHINE_NAME n`, `OWNER u`, `START_AFTER_PULL true\|false` | pull target |
//! | `CLONE [name]`, `CLONE_DESTINATION dir`, `EXECUTE command` (repeatable) | after a pull |
//! | `MINIMUM_REQUIREMENT CPU\|MEMORY\|DISK n` | memory and disk in MiB |
//! | `COMPRESS_PACK [true\|false]`, `COMPRESS_PACK_LEVEL best_speed\|balanced\|best_compression\|default\|no_compression` | accepted; Hangar compresses each chunk at one fixed level, so neither changes a push ([`PdFile::unused`]) |
//! | `IS_COMPRESSED [true\|false]`, `VM_TYPE pvm\|macvm\|qemu`, `VM_SIZE mb`, `VM_REMOTE_PATH path`, `FORCE [true\|false]` | `import-vm` (a bare `FORCE` is true; `VM_TYPE` also sets a push's type) |
//! | `CLIENT base64` | the reference's telemetry payload: accepted, never sent ([`PdFile::unused`]) |
//! | `RUN\|DO push\|pull\|list\|import\|import-vm`, or `PUSH`, `PULL`, `LIST`, `IMPORT` | the command |

use std::fmt;

use crate::arch::Architecture;
use crate::model::MinimumRequirements;

/// What a PDFile asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PdCommand {
    /// Push `LOCAL_PATH` to `TO`.
    Push,
    /// Pull from `FROM` to `DESTINATION`.
    Pull,
    /// List the catalog.
    List,
    /// Import a reference entry.
    Import,
    /// Register a VM pack already in storage (`RUN import-vm` only, as the reference).
    ImportVm,
}

impl PdCommand {
    fn parse(s: &str) -> Option<PdCommand> {
        match s.trim().to_ascii_lowercase().as_str() {
            "push" => Some(PdCommand::Push),
            "pull" => Some(PdCommand::Pull),
            "list" => Some(PdCommand::List),
            "import" => Some(PdCommand::Import),
            "import-vm" | "import_vm" => Some(PdCommand::ImportVm),
            _ => None,
        }
    }
}

/// A parsed PDFile. Fields not given are `None` / empty.
#[derive(Clone, Default, PartialEq)]
pub struct PdFile {
    /// `RUN`/`DO`/bare command.
    pub command: Option<PdCommand>,
    /// `FROM`: catalog server URL (credentials removed).
    pub from: Option<String>,
    /// `TO`: catalog server URL (credentials removed).
    pub to: Option<String>,
    /// `INSECURE`.
    pub insecure: bool,
    /// `AUTHENTICATE USERNAME`.
    pub username: Option<String>,
    /// `AUTHENTICATE PASSWORD`.
    pub password: Option<String>,
    /// `AUTHENTICATE API_KEY`.
    pub api_key: Option<String>,
    /// `PROVIDER`: the connection string (checked).
    pub provider: Option<String>,
    /// `CATALOG_ID`.
    pub catalog_id: Option<String>,
    /// `VERSION`.
    pub version: Option<String>,
    /// `ARCHITECTURE`.
    pub architecture: Option<Architecture>,
    /// `DESCRIPTION`.
    pub description: Option<String>,
    /// `TAG`.
    pub tags: Vec<String>,
    /// `ROLE`.
    pub roles: Vec<String>,
    /// `CLAIM`.
    pub claims: Vec<String>,
    /// `LOCAL_PATH`.
    pub local_path: Option<String>,
    /// `DESTINATION`.
    pub destination: Option<String>,
    /// `MACHINE_NAME`.
    pub machine_name: Option<String>,
    /// `OWNER`.
    pub owner: Option<String>,
    /// `START_AFTER_PULL`.
    pub start_after_pull: bool,
    /// `CLONE [name]`: `Some(None)` clones with a generated name.
    pub clone: Option<Option<String>>,
    /// `CLONE_DESTINATION`.
    pub clone_destination: Option<String>,
    /// `EXECUTE`, in order.
    pub execute: Vec<String>,
    /// `MINIMUM_REQUIREMENT`.
    pub minimum_requirements: Option<MinimumRequirements>,
    /// `COMPRESS_PACK` (accepted, not used: see [`PdFile::unused`]).
    pub compress_pack: Option<bool>,
    /// `COMPRESS_PACK_LEVEL`, lower case (accepted, not used).
    pub compress_pack_level: Option<String>,
    /// `IS_COMPRESSED` (import-vm).
    pub is_compressed: Option<bool>,
    /// `VM_TYPE`: `pvm`, `macvm` (the reference's) or `qemu`.
    pub vm_type: Option<String>,
    /// `VM_SIZE`, in MB (import-vm).
    pub vm_size: Option<u64>,
    /// `VM_REMOTE_PATH` (import-vm).
    pub vm_remote_path: Option<String>,
    /// `FORCE` (import-vm: replace an existing entry).
    pub force: bool,
    /// `CLIENT`: the reference's telemetry payload (accepted, never sent).
    pub client: Option<String>,
}

impl fmt::Debug for PdFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PdFile")
            .field("command", &self.command)
            .field("from", &self.from)
            .field("to", &self.to)
            .field("catalog_id", &self.catalog_id)
            .field("version", &self.version)
            .field("architecture", &self.architecture)
            .field("provider", &self.provider.as_ref().map(|_| "****"))
            .field("password", &self.password.as_ref().map(|_| "****"))
            .field("api_key", &self.api_key.as_ref().map(|_| "****"))
            .finish_non_exhaustive()
    }
}

impl PdFile {
    /// The directives given that Hangar accepts but does not act on, each with why.
    pub fn unused(&self) -> Vec<(&'static str, &'static str)> {
        let mut out = Vec::new();
        if self.client.is_some() {
            out.push(("CLIENT", "the reference's telemetry payload; Hangar sends no telemetry"));
        }
        if self.compress_pack.is_some() {
            out.push(("COMPRESS_PACK", "Hangar always compresses each chunk of an image"));
        }
        if self.compress_pack_level.is_some() {
            out.push(("COMPRESS_PACK_LEVEL", "Hangar compresses each chunk at one fixed level"));
        }
        out
    }

    /// The command: the explicit one, else `pull` with `FROM`, `push` with `TO`.
    pub fn effective_command(&self) -> Option<PdCommand> {
        self.command.or(match (&self.from, &self.to) {
            (Some(_), None) => Some(PdCommand::Pull),
            (None, Some(_)) => Some(PdCommand::Push),
            _ => None,
        })
    }
}

/// A PDFile error, with its 1-based line number (0 for the file as a whole).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("PDFile line {line}: {message}")]
pub struct PdFileError {
    /// Line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

fn err(line: usize, message: impl Into<String>) -> PdFileError {
    PdFileError { line, message: message.into() }
}

/// Replaces `{{ .Env.NAME }}` / `{{ NAME }}` placeholders in one line.
fn substitute(line: &str, n: usize, env: &dyn Fn(&str) -> Option<String>) -> Result<String, PdFileError> {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or_else(|| err(n, "'{{' without a closing '}}'"))?;
        let inner = after[..end].trim();
        let name = inner.strip_prefix(".Env.").unwrap_or(inner).trim();
        let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(err(n, format!("placeholder {{{{ {inner} }}}} is not {{{{ .Env.NAME }}}}")));
        }
        let value = env(name).ok_or_else(|| err(n, format!("environment variable {name} is not set")))?;
        out.push_str(&value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn parse_bool(n: usize, directive: &str, v: &str) -> Result<bool, PdFileError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "on" => Ok(true),
        "false" | "no" | "0" | "off" => Ok(false),
        _ => Err(err(n, format!("{directive} takes true or false, not {v:?}"))),
    }
}

fn list(v: &str) -> impl Iterator<Item = String> + '_ {
    v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string)
}

/// Parses a catalog URL: adds a scheme when missing (`http` when insecure),
/// accepts the reference's `host=` prefix, and returns the URL without
/// credentials plus the user and password found in it.
fn parse_url(
    n: usize,
    directive: &str,
    raw: &str,
    insecure: bool,
) -> Result<(String, Option<String>, Option<String>), PdFileError> {
    let raw = raw.trim();
    let raw = raw.strip_prefix("host=").unwrap_or(raw);
    let with_scheme = if raw.contains("://") {
        raw.to_string()
    } else {
        format!("{}://{raw}", if insecure { "http" } else { "https" })
    };
    let mut url =
        reqwest::Url::parse(&with_scheme).map_err(|e| err(n, format!("{directive} {raw:?} is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(err(n, format!("{directive} must be an http(s) URL with a host")));
    }
    let user = (!url.username().is_empty()).then(|| url.username().to_string());
    let pass = url.password().map(str::to_string);
    let _ = url.set_username("");
    let _ = url.set_password(None);
    Ok((url.as_str().trim_end_matches('/').to_string(), user, pass))
}

/// Single-valued fields remember the line that set them.
#[derive(Default)]
struct Seen(std::collections::HashMap<&'static str, usize>);

impl Seen {
    fn once(&mut self, n: usize, key: &'static str) -> Result<(), PdFileError> {
        if let Some(first) = self.0.insert(key, n) {
            return Err(err(n, format!("{key} is given twice (first at line {first})")));
        }
        Ok(())
    }
}

/// Parses a PDFile. `env` looks up placeholder values (use
/// `|k| std::env::var(k).ok()` for the process environment).
pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<PdFile, PdFileError> {
    let mut f = PdFile::default();
    let mut seen = Seen::default();
    let mut provider_name: Option<String> = None;
    let mut provider_pairs: Vec<(String, String)> = Vec::new();
    let mut provider_line = 0usize;
    let mut urls: Vec<(usize, &'static str, String)> = Vec::new();
    let mut url_creds: (Option<String>, Option<String>) = (None, None);

    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with("//") {
            continue;
        }
        let line = substitute(trimmed, n, env)?;
        let (directive, arg) = match line.split_once(char::is_whitespace) {
            Some((d, a)) => (d.to_ascii_uppercase(), a.trim().to_string()),
            None => (line.to_ascii_uppercase(), String::new()),
        };
        let need = |what: &str| -> Result<(), PdFileError> {
            if arg.is_empty() { Err(err(n, format!("{directive} needs {what}"))) } else { Ok(()) }
        };
        match directive.as_str() {
            "FROM" | "TO" => {
                need("a catalog URL")?;
                let key: &'static str = if directive == "FROM" { "FROM" } else { "TO" };
                seen.once(n, key)?;
                urls.push((n, key, arg.clone()));
            }
            "INSECURE" => {
                seen.once(n, "INSECURE")?;
                f.insecure = parse_bool(n, "INSECURE", &arg)?;
            }
            "AUTHENTICATE" => {
                let (kind, value) = arg
                    .split_once(char::is_whitespace)
                    .map(|(k, v)| (k.to_ascii_uppercase(), v.trim().to_string()))
                    .ok_or_else(|| err(n, "AUTHENTICATE takes USERNAME, PASSWORD or API_KEY and a value"))?;
                if value.is_empty() {
                    return Err(err(n, format!("AUTHENTICATE {kind} needs a value")));
                }
                match kind.as_str() {
                    "USERNAME" => {
                        seen.once(n, "AUTHENTICATE USERNAME")?;
                        f.username = Some(value);
                    }
                    "PASSWORD" => {
                        seen.once(n, "AUTHENTICATE PASSWORD")?;
                        f.password = Some(value);
                    }
                    "API_KEY" | "APIKEY" => {
                        seen.once(n, "AUTHENTICATE API_KEY")?;
                        f.api_key = Some(value);
                    }
                    other => {
                        return Err(err(
                            n,
                            format!("AUTHENTICATE {other} is unknown: use USERNAME, PASSWORD or API_KEY"),
                        ));
                    }
                }
            }
            "PROVIDER" => {
                need("a connection string or NAME/KEY value")?;
                if provider_line == 0 {
                    provider_line = n;
                }
                if arg.contains('=') && !arg.contains(char::is_whitespace)
                    || arg.to_ascii_lowercase().starts_with("provider=")
                {
                    if f.provider.is_some() || provider_name.is_some() || !provider_pairs.is_empty() {
                        return Err(err(n, "PROVIDER is given twice"));
                    }
                    f.provider = Some(arg.clone());
                } else {
                    if f.provider.is_some() {
                        return Err(err(n, "PROVIDER lines mix a connection string and NAME/KEY lines"));
                    }
                    let (k, v) = arg
                        .split_once(char::is_whitespace)
                        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
                        .ok_or_else(|| err(n, "PROVIDER takes a connection string, NAME x, or KEY value"))?;
                    if v.contains(';') {
                        return Err(err(n, format!("PROVIDER {k}: a value may not contain ';'")));
                    }
                    if k == "name" || k == "provider" {
                        if provider_name.is_some() {
                            return Err(err(n, "PROVIDER NAME is given twice"));
                        }
                        provider_name = Some(v);
                    } else {
                        provider_pairs.push((k, v));
                    }
                }
            }
            "CATALOG_ID" => {
                need("an id")?;
                seen.once(n, "CATALOG_ID")?;
                crate::service::validate_catalog_id(&arg).map_err(|e| err(n, e.to_string()))?;
                f.catalog_id = Some(arg.clone());
            }
            "VERSION" => {
                need("a version")?;
                seen.once(n, "VERSION")?;
                crate::version::validate_version(&arg).map_err(|e| err(n, e))?;
                f.version = Some(arg.clone());
            }
            "ARCHITECTURE" => {
                need("an architecture")?;
                seen.once(n, "ARCHITECTURE")?;
                f.architecture =
                    Some(arg.parse().map_err(|e: crate::arch::UnknownArchitecture| err(n, e.to_string()))?);
            }
            "DESCRIPTION" => {
                need("text")?;
                seen.once(n, "DESCRIPTION")?;
                f.description = Some(arg.clone());
            }
            "TAG" | "TAGS" => {
                need("one or more tags")?;
                f.tags.extend(list(&arg));
            }
            "ROLE" | "ROLES" => {
                need("one or more roles")?;
                f.roles.extend(list(&arg));
            }
            "CLAIM" | "CLAIMS" => {
                need("one or more claims")?;
                f.claims.extend(list(&arg));
            }
            "LOCAL_PATH" => {
                need("a folder")?;
                seen.once(n, "LOCAL_PATH")?;
                f.local_path = Some(arg.clone());
            }
            "DESTINATION" => {
                need("a folder")?;
                seen.once(n, "DESTINATION")?;
                f.destination = Some(arg.clone());
            }
            "MACHINE_NAME" => {
                need("a name")?;
                seen.once(n, "MACHINE_NAME")?;
                if arg.contains('/') || arg == "." || arg == ".." {
                    return Err(err(n, "MACHINE_NAME may not contain '/'"));
                }
                f.machine_name = Some(arg.clone());
            }
            "OWNER" => {
                need("a user")?;
                seen.once(n, "OWNER")?;
                f.owner = Some(arg.clone());
            }
            "START_AFTER_PULL" => {
                seen.once(n, "START_AFTER_PULL")?;
                f.start_after_pull = parse_bool(n, "START_AFTER_PULL", &arg)?;
            }
            "CLONE" => {
                seen.once(n, "CLONE")?;
                f.clone = Some((!arg.is_empty()).then(|| arg.clone()));
            }
            "CLONE_DESTINATION" => {
                need("a folder")?;
                seen.once(n, "CLONE_DESTINATION")?;
                f.clone_destination = Some(arg.clone());
            }
            "EXECUTE" => {
                need("a command")?;
                f.execute.push(arg.clone());
            }
            "MINIMUM_REQUIREMENT" | "MINIMUM_REQUIREMENTS" => {
                let (kind, value) = arg
                    .split_once(char::is_whitespace)
                    .map(|(k, v)| (k.to_ascii_uppercase(), v.trim().to_string()))
                    .ok_or_else(|| err(n, "MINIMUM_REQUIREMENT takes CPU, MEMORY or DISK and a number"))?;
                let number: u64 = value
                    .parse()
                    .map_err(|_| err(n, format!("MINIMUM_REQUIREMENT {kind} takes a whole number, not {value:?}")))?;
                let r = f.minimum_requirements.get_or_insert_with(MinimumRequirements::default);
                match kind.as_str() {
                    "CPU" => {
                        seen.once(n, "MINIMUM_REQUIREMENT CPU")?;
                        r.cpu = u32::try_from(number).map_err(|_| err(n, "CPU count is too large"))?;
                    }
                    "MEMORY" => {
                        seen.once(n, "MINIMUM_REQUIREMENT MEMORY")?;
                        r.memory = number;
                    }
                    "DISK" => {
                        seen.once(n, "MINIMUM_REQUIREMENT DISK")?;
                        r.disk = number;
                    }
                    other => {
                        return Err(err(n, format!("MINIMUM_REQUIREMENT {other} is unknown: use CPU, MEMORY or DISK")));
                    }
                }
            }
            "COMPRESS_PACK" => {
                seen.once(n, "COMPRESS_PACK")?;
                f.compress_pack = Some(arg.is_empty() || parse_bool(n, "COMPRESS_PACK", &arg)?);
            }
            "COMPRESS_PACK_LEVEL" => {
                need("best_speed, balanced, best_compression, default or no_compression")?;
                seen.once(n, "COMPRESS_PACK_LEVEL")?;
                let level = arg.to_ascii_lowercase();
                if !["best_speed", "balanced", "best_compression", "default", "no_compression"]
                    .contains(&level.as_str())
                {
                    return Err(err(
                        n,
                        format!(
                            "COMPRESS_PACK_LEVEL {arg:?}: use best_speed, balanced, best_compression, default or no_compression"
                        ),
                    ));
                }
                f.compress_pack_level = Some(level);
            }
            "IS_COMPRESSED" => {
                seen.once(n, "IS_COMPRESSED")?;
                f.is_compressed = Some(arg.is_empty() || parse_bool(n, "IS_COMPRESSED", &arg)?);
            }
            "FORCE" => {
                seen.once(n, "FORCE")?;
                f.force = arg.is_empty() || parse_bool(n, "FORCE", &arg)?;
            }
            "VM_TYPE" => {
                need("pvm or macvm")?;
                seen.once(n, "VM_TYPE")?;
                let t = arg.to_ascii_lowercase();
                if !["pvm", "macvm", "qemu"].contains(&t.as_str()) {
                    return Err(err(n, format!("VM_TYPE {arg:?}: use pvm or macvm (or qemu for a QEMU image)")));
                }
                f.vm_type = Some(t);
            }
            "VM_SIZE" => {
                need("a size in MB")?;
                seen.once(n, "VM_SIZE")?;
                let size: u64 =
                    arg.parse().ok().filter(|s| *s > 0).ok_or_else(|| {
                        err(n, format!("VM_SIZE {arg:?}: give the size in MB as a whole number above 0"))
                    })?;
                f.vm_size = Some(size);
            }
            "VM_REMOTE_PATH" => {
                need("the path of the pack in the provider")?;
                seen.once(n, "VM_REMOTE_PATH")?;
                f.vm_remote_path = Some(arg.clone());
            }
            "CLIENT" => {
                need("the client payload")?;
                seen.once(n, "CLIENT")?;
                f.client = Some(arg.clone());
            }
            "RUN" | "DO" => {
                need("push, pull, list, import or import-vm")?;
                seen.once(n, "command")?;
                f.command = Some(PdCommand::parse(&arg).ok_or_else(|| {
                    err(n, format!("{directive} {arg:?}: use push, pull, list, import or import-vm"))
                })?);
            }
            "PUSH" | "PULL" | "LIST" | "IMPORT" if arg.is_empty() => {
                seen.once(n, "command")?;
                f.command = PdCommand::parse(&directive);
            }
            other => {
                return Err(err(
                    n,
                    format!(
                        "unknown directive {other}; see the PDFile directives in the README (a comment starts with #)"
                    ),
                ));
            }
        }
    }

    for (n, key, raw) in urls {
        let (url, user, pass) = parse_url(n, key, &raw, f.insecure)?;
        if user.is_some() {
            url_creds = (user, pass);
        }
        if key == "FROM" {
            f.from = Some(url);
        } else {
            f.to = Some(url);
        }
    }
    // Credentials in the URL: user:password, or an API key alone as the user.
    match url_creds {
        (Some(u), Some(p)) => {
            f.username.get_or_insert(u);
            f.password.get_or_insert(p);
        }
        (Some(k), None) => {
            f.api_key.get_or_insert(k);
        }
        _ => {}
    }
    if f.provider.is_none() && (provider_name.is_some() || !provider_pairs.is_empty()) {
        let name = provider_name.ok_or_else(|| err(provider_line, "PROVIDER lines without PROVIDER NAME"))?;
        let mut cs = format!("provider={name}");
        for (k, v) in provider_pairs {
            cs.push_str(&format!(";{k}={v}"));
        }
        f.provider = Some(cs);
    }
    if let Some(cs) = &f.provider {
        cs.parse::<hangar_blobstore::StoreConfig>().map_err(|e| err(provider_line, format!("PROVIDER: {e}")))?;
    }
    if f.from.is_some() && f.to.is_some() && f.command.is_none() {
        return Err(err(0, "FROM and TO are both given: add RUN push or RUN pull"));
    }
    Ok(f)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "TOKEN" => Some("s3cr3t".into()),
            "BUCKET" => Some("images".into()),
            "HOST" => Some("catalog.example.test:8443".into()),
            _ => None,
        }
    }

    fn ok(text: &str) -> PdFile {
        parse(text, &env).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    #[test]
    fn full_push_file() {
        let f = ok("# a push\n\
            TO https://catalog.example.test\n\
            AUTHENTICATE USERNAME alice\n\
            AUTHENTICATE PASSWORD {{ .Env.TOKEN }}\n\
            PROVIDER provider=aws-s3;bucket={{BUCKET}};region=eu-west-1;access_key=AK;secret_key={{ .Env.TOKEN }}\n\
            CATALOG_ID ubuntu-ci\n\
            VERSION 1.2.0\n\
            ARCHITECTURE amd64\n\
            DESCRIPTION Ubuntu for CI\n\
            TAG ci, linux\n\
            TAG ubuntu\n\
            ROLE TEAM_A\n\
            CLAIM USE_UBUNTU\n\
            LOCAL_PATH /vms/ubuntu.pvm\n\
            MINIMUM_REQUIREMENT CPU 2\n\
            MINIMUM_REQUIREMENT MEMORY 4096\n\
            \n\
            // done\n");
        assert_eq!(f.effective_command(), Some(PdCommand::Push));
        assert_eq!(f.to.as_deref(), Some("https://catalog.example.test"));
        assert_eq!(f.username.as_deref(), Some("alice"));
        assert_eq!(f.password.as_deref(), Some("s3cr3t"));
        assert!(f.provider.as_deref().unwrap().contains("bucket=images"));
        assert_eq!(f.catalog_id.as_deref(), Some("ubuntu-ci"));
        assert_eq!(f.architecture, Some(Architecture::X86_64));
        assert_eq!(f.tags, vec!["ci", "linux", "ubuntu"]);
        assert_eq!(f.roles, vec!["TEAM_A"]);
        assert_eq!(f.claims, vec!["USE_UBUNTU"]);
        assert_eq!(f.local_path.as_deref(), Some("/vms/ubuntu.pvm"));
        assert_eq!(f.minimum_requirements, Some(MinimumRequirements { cpu: 2, memory: 4096, disk: 0 }));
        // Debug output hides secrets.
        let dbg = format!("{f:?}");
        assert!(!dbg.contains("s3cr3t"), "{dbg}");
    }

    #[test]
    fn full_pull_file() {
        let f = ok("FROM {{ .Env.HOST }}\n\
            INSECURE true\n\
            AUTHENTICATE API_KEY a2V5OnNlY3JldA==\n\
            CATALOG_ID macos\n\
            VERSION latest\n\
            ARCHITECTURE aarch64\n\
            DESTINATION /tmp/vms\n\
            MACHINE_NAME runner-1\n\
            OWNER bob\n\
            START_AFTER_PULL yes\n\
            CLONE runner-1-clone\n\
            CLONE_DESTINATION /tmp/clones\n\
            EXECUTE echo hello\n\
            EXECUTE uname -a\n");
        assert_eq!(f.effective_command(), Some(PdCommand::Pull));
        // INSECURE after FROM still makes the URL plain HTTP.
        assert_eq!(f.from.as_deref(), Some("http://catalog.example.test:8443"));
        assert_eq!(f.api_key.as_deref(), Some("a2V5OnNlY3JldA=="));
        assert_eq!(f.architecture, Some(Architecture::Arm64));
        assert!(f.start_after_pull);
        assert_eq!(f.clone, Some(Some("runner-1-clone".into())));
        assert_eq!(f.execute, vec!["echo hello", "uname -a"]);
        assert_eq!(f.machine_name.as_deref(), Some("runner-1"));
    }

    #[test]
    fn import_vm_push_options_and_client_directives() {
        // As the reference's docs write an import-vm file.
        let f = ok("# import a pack already in the bucket\n\
            RUN import-vm\n\
            TO https://{{ .Env.HOST }}\n\
            AUTHENTICATE USERNAME user\n\
            AUTHENTICATE PASSWORD {{ TOKEN }}\n\
            PROVIDER NAME aws-s3\n\
            PROVIDER BUCKET {{BUCKET}}\n\
            PROVIDER REGION us-east-2\n\
            CATALOG_ID ubuntu\n\
            VERSION 1.0.0\n\
            ARCHITECTURE amd64\n\
            VM_TYPE macvm\n\
            VM_SIZE 20480\n\
            VM_REMOTE_PATH images/ubuntu.pvm\n\
            IS_COMPRESSED\n\
            FORCE\n\
            COMPRESS_PACK true\n\
            COMPRESS_PACK_LEVEL Best_Speed\n\
            CLIENT eyJuYW1lIjoiY2kifQ==\n");
        assert_eq!(f.effective_command(), Some(PdCommand::ImportVm));
        assert_eq!(f.vm_type.as_deref(), Some("macvm"));
        assert_eq!(f.vm_size, Some(20480));
        assert_eq!(f.vm_remote_path.as_deref(), Some("images/ubuntu.pvm"));
        assert_eq!(f.is_compressed, Some(true));
        assert!(f.force);
        assert_eq!(f.compress_pack, Some(true));
        assert_eq!(f.compress_pack_level.as_deref(), Some("best_speed"));
        assert_eq!(f.client.as_deref(), Some("eyJuYW1lIjoiY2kifQ=="));
        assert_eq!(f.password.as_deref(), Some("s3cr3t"));
        let unused: Vec<&str> = f.unused().into_iter().map(|(d, _)| d).collect();
        assert_eq!(unused, ["CLIENT", "COMPRESS_PACK", "COMPRESS_PACK_LEVEL"]);
        let f = ok("FORCE false\nIS_COMPRESSED no\nDO IMPORT-VM\n");
        assert!(!f.force);
        assert_eq!(f.is_compressed, Some(false));
        for (text, line, needle) in [
            ("VM_TYPE parallels-desktop\n", 1, "use pvm or macvm"),
            ("CATALOG_ID x\nVM_SIZE 0\n", 2, "above 0"),
            ("COMPRESS_PACK_LEVEL fastest\n", 1, "best_speed"),
            ("CLIENT\n", 1, "CLIENT needs"),
            ("IMPORT-VM\n", 1, "unknown directive IMPORT-VM"),
            ("PREFIX /x\n", 1, "unknown directive PREFIX"),
            ("RUN clone\n", 1, "import-vm"),
        ] {
            let e = parse(text, &env).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn table_of_accepted_forms() {
        type Check = dyn Fn(&PdFile) -> bool;
        let cases: &[(&str, &Check)] = &[
            ("run push", &|f| f.command == Some(PdCommand::Push)),
            ("DO Pull", &|f| f.command == Some(PdCommand::Pull)),
            ("LIST", &|f| f.command == Some(PdCommand::List)),
            ("import", &|f| f.command == Some(PdCommand::Import)),
            ("from http://u:p@h:8080", &|f| {
                f.from.as_deref() == Some("http://h:8080")
                    && f.username.as_deref() == Some("u")
                    && f.password.as_deref() == Some("p")
            }),
            ("FROM host=KEYVALUE@h", &|f| {
                f.api_key.as_deref() == Some("KEYVALUE") && f.from.as_deref() == Some("https://h")
            }),
            ("PROVIDER NAME local-storage\nPROVIDER CATALOG_PATH /srv/catalog", &|f| {
                f.provider.as_deref() == Some("provider=local-storage;catalog_path=/srv/catalog")
            }),
            ("CLONE", &|f| f.clone == Some(None)),
            ("INSECURE false", &|f| !f.insecure),
            ("MINIMUM_REQUIREMENT disk 20000", &|f| f.minimum_requirements.is_some_and(|r| r.disk == 20000)),
            ("  # comment\n\n   ", &|f| *f == PdFile::default()),
            ("ARCHITECTURE arm", &|f| f.architecture == Some(Architecture::Arm64)),
            ("CLAIM A,B\nCLAIM C", &|f| f.claims == ["A", "B", "C"]),
        ];
        for (text, check) in cases {
            let f = ok(text);
            assert!(check(&f), "{text:?} parsed as {f:?}");
        }
    }

    #[test]
    fn table_of_errors_with_line_numbers() {
        let cases: &[(&str, usize, &str)] = &[
            ("CATALOG_ID a\nFROBNICATE x", 2, "unknown directive FROBNICATE"),
            ("INSECURE maybe", 1, "true or false"),
            ("\n\nARCHITECTURE sparc", 3, "unknown architecture"),
            ("VERSION 1 2", 1, "version"),
            ("CATALOG_ID ../etc", 1, "catalog id"),
            ("CATALOG_ID cache", 1, "reserved"),
            ("AUTHENTICATE TOKEN x", 1, "USERNAME, PASSWORD or API_KEY"),
            ("AUTHENTICATE USERNAME", 1, "AUTHENTICATE takes"),
            ("MINIMUM_REQUIREMENT CPU two", 1, "whole number"),
            ("MINIMUM_REQUIREMENT GPU 1", 1, "GPU is unknown"),
            ("PROVIDER provider=nope;x=y", 1, "unknown provider"),
            ("# c\nPROVIDER BUCKET b", 2, "without PROVIDER NAME"),
            ("PROVIDER NAME aws-s3\nPROVIDER BUCKET b\nPROVIDER COLOUR red", 1, "unknown key"),
            ("PROVIDER provider=local-storage;catalog_path=/x\nPROVIDER NAME aws-s3", 2, "mix"),
            ("FROM http://a\nFROM http://b", 2, "twice (first at line 1)"),
            ("FROM ftp://a", 1, "http(s) URL"),
            ("DESCRIPTION {{ .Env.MISSING }}", 1, "MISSING is not set"),
            ("DESCRIPTION {{ .Env.A B }}", 1, "placeholder"),
            ("DESCRIPTION {{ oops", 1, "closing"),
            ("RUN dance", 1, "use push, pull"),
            ("MACHINE_NAME a/b", 1, "'/'"),
            ("FROM http://a\nTO http://b", 0, "RUN push or RUN pull"),
            ("TAG", 1, "needs"),
        ];
        for (text, line, needle) in cases {
            match parse(text, &env) {
                Ok(f) => panic!("{text:?} was accepted: {f:?}"),
                Err(e) => {
                    assert_eq!(e.line, *line, "{text:?}: {e}");
                    assert!(e.to_string().contains(needle), "{text:?}: {e} lacks {needle:?}");
                }
            }
        }
    }

    #[test]
    fn provider_errors_do_not_echo_secrets() {
        let e = parse("PROVIDER provider=aws-s3;secret_key=TOPSECRET;colour=red", &env).unwrap_err();
        assert!(!e.to_string().contains("TOPSECRET"), "{e}");
    }
}
