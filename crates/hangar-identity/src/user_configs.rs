//! Per-user settings (`/user/configs`, reference §1.2): small typed key/value records a user
//! keeps for itself (the web UI's preferences). Each belongs to exactly one user and only that
//! user reads or changes it, whoever else asks (a super user too: they are preferences, not
//! resources). A value is checked against its type (`string`, `bool`, `int`, `json`) before
//! anything is written, and every change is one batch with its audit entry (the value itself
//! is not copied into the audit log).
//!
//! Records live in the `user_configs` collection under `<user id>:<slug, lower case>`, so a
//! slug is unique per user by an `Absent` condition; deleting a user deletes its configs in
//! the same batch.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use hangar_core::Principal;
use hangar_core::audit::{AUDIT_COLLECTION, Actor, AuditEntry};
use hangar_store::Batch;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::{IdentityError, Result};
use crate::service::Identity;

/// Store collection of user configs.
pub const USER_CONFIGS: &str = "user_configs";
/// Most configs one user may keep.
pub const MAX_CONFIGS_PER_USER: usize = 256;
/// Longest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
const MAX_SLUG: usize = 128;
const MAX_NAME: usize = 256;

/// The type of a config's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UserConfigType {
    #[default]
    String,
    Bool,
    Int,
    Json,
}

impl UserConfigType {
    pub fn as_str(&self) -> &'static str {
        match self {
            UserConfigType::String => "string",
            UserConfigType::Bool => "bool",
            UserConfigType::Int => "int",
            UserConfigType::Json => "json",
        }
    }

    /// Whether `value` is a value of this type.
    pub fn check(&self, value: &str) -> Result<()> {
        let ok = match self {
            UserConfigType::String => true,
            UserConfigType::Bool => matches!(value.trim(), "true" | "false"),
            UserConfigType::Int => value.trim().parse::<i64>().is_ok(),
            UserConfigType::Json => serde_json::from_str::<serde_json::Value>(value).is_ok(),
        };
        if ok {
            Ok(())
        } else {
            let want = match self {
                UserConfigType::String => "a string",
                UserConfigType::Bool => "true or false",
                UserConfigType::Int => "a whole number",
                UserConfigType::Json => "a JSON document",
            };
            Err(IdentityError::Invalid(format!("value must be {want} for a config of type {}", self.as_str())))
        }
    }
}

impl fmt::Display for UserConfigType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for UserConfigType {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "string" => Ok(UserConfigType::String),
            "bool" => Ok(UserConfigType::Bool),
            "int" => Ok(UserConfigType::Int),
            "json" => Ok(UserConfigType::Json),
            _ => Err(IdentityError::Invalid("type must be one of: string, bool, int, json".into())),
        }
    }
}

/// One stored config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserConfig {
    pub id: String,
    pub user_id: String,
    pub slug: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: UserConfigType,
    pub value: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A new config, or the whole of one that replaces another with the same slug.
#[derive(Debug, Clone, Default)]
pub struct NewUserConfig {
    pub slug: String,
    pub name: String,
    /// `None`: string.
    pub kind: Option<String>,
    pub value: String,
}

/// A change: only the fields given change.
#[derive(Debug, Clone, Default)]
pub struct UserConfigUpdate {
    pub name: Option<String>,
    pub kind: Option<String>,
    pub value: Option<String>,
}

/// Whether a write created the config or replaced one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Created,
    Updated,
}

fn key(user_id: &str, slug: &str) -> String {
    format!("{user_id}:{}", slug.to_ascii_lowercase())
}

fn check_slug(slug: &str) -> Result<()> {
    if slug.is_empty() {
        return Err(IdentityError::Invalid("slug is required".into()));
    }
    if slug.len() > MAX_SLUG || !slug.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(IdentityError::Invalid(format!(
            "slug must be at most {MAX_SLUG} letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(())
}

fn check_name(name: &str) -> Result<()> {
    if name.trim().is_empty() {
        return Err(IdentityError::Invalid("name is required".into()));
    }
    if name.chars().count() > MAX_NAME || name.chars().any(|c| c.is_control()) {
        return Err(IdentityError::Invalid(format!("name must be at most {MAX_NAME} printable characters")));
    }
    Ok(())
}

fn check_value(kind: UserConfigType, value: &str) -> Result<()> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(IdentityError::Invalid(format!("value must be at most {MAX_VALUE_BYTES} bytes")));
    }
    kind.check(value)
}

fn audited(batch: Batch, actor: &Actor, action: &str, c: &UserConfig) -> Result<Batch> {
    let entry = AuditEntry::new(actor, action, "user_config", &c.id, json!({"slug": c.slug, "type": c.kind.as_str()}));
    let v = serde_json::to_value(&entry).map_err(|e| IdentityError::Internal(format!("serialise: {e}")))?;
    Ok(batch.put(AUDIT_COLLECTION, &entry.id, v))
}

fn value_of(c: &UserConfig) -> Result<serde_json::Value> {
    serde_json::to_value(c).map_err(|e| IdentityError::Internal(format!("serialise: {e}")))
}

impl Identity {
    /// The caller's configs, by slug.
    pub async fn list_user_configs(&self, by: &Principal) -> Result<Vec<UserConfig>> {
        let mut out: Vec<UserConfig> = self.own_configs(by).await?.into_iter().map(|(c, _)| c).collect();
        out.sort_by(|a, b| a.slug.cmp(&b.slug));
        Ok(out)
    }

    /// One of the caller's configs, by id or slug (any case); another user's is a 404.
    pub async fn get_user_config(&self, by: &Principal, ident: &str) -> Result<UserConfig> {
        self.find_user_config(by, ident).await.map(|(c, _)| c)
    }

    /// Create a config, or replace the caller's config with the same slug (the reference's
    /// upsert on `POST`).
    pub async fn put_user_config(
        &self,
        by: &Principal,
        actor: &Actor,
        input: NewUserConfig,
    ) -> Result<(UserConfig, Written)> {
        check_slug(&input.slug)?;
        check_name(&input.name)?;
        let kind: UserConfigType = input.kind.as_deref().unwrap_or("").parse()?;
        check_value(kind, &input.value)?;
        let existing =
            self.find_user_config(by, &input.slug).await.ok().filter(|(c, _)| c.slug.eq_ignore_ascii_case(&input.slug));
        let now = Utc::now();
        let k = key(&by.user_id, &input.slug);
        let (config, batch, action, written) = match existing {
            Some((old, rev)) => {
                let c = UserConfig { name: input.name, kind, value: input.value, updated_at: now, ..old };
                (c, Batch::new().require_revision(USER_CONFIGS, &k, rev), "user_config.update", Written::Updated)
            }
            None => {
                if self.own_configs(by).await?.len() >= MAX_CONFIGS_PER_USER {
                    return Err(IdentityError::Invalid(format!(
                        "A user keeps at most {MAX_CONFIGS_PER_USER} configs; delete one first"
                    )));
                }
                let c = UserConfig {
                    id: uuid::Uuid::now_v7().to_string(),
                    user_id: by.user_id.clone(),
                    slug: input.slug,
                    name: input.name,
                    kind,
                    value: input.value,
                    created_at: now,
                    updated_at: now,
                };
                (c, Batch::new().require_absent(USER_CONFIGS, &k), "user_config.create", Written::Created)
            }
        };
        let batch = audited(batch.put(USER_CONFIGS, &k, value_of(&config)?), actor, action, &config)?;
        self.store().commit(batch).await?;
        Ok((config, written))
    }

    /// Change the caller's config `ident` (id or slug); only the fields given change, and the
    /// value is checked against the resulting type. An unknown slug creates the config, as the
    /// reference does (name defaults to the slug).
    pub async fn update_user_config(
        &self,
        by: &Principal,
        actor: &Actor,
        ident: &str,
        upd: UserConfigUpdate,
    ) -> Result<(UserConfig, Written)> {
        let (old, rev) = match self.find_user_config(by, ident).await {
            Ok(found) => found,
            Err(IdentityError::NotFound { .. }) => {
                let input = NewUserConfig {
                    slug: ident.to_string(),
                    name: upd.name.unwrap_or_else(|| ident.to_string()),
                    kind: upd.kind,
                    value: upd.value.unwrap_or_default(),
                };
                return self.put_user_config(by, actor, input).await;
            }
            Err(e) => return Err(e),
        };
        let kind = match upd.kind.as_deref() {
            Some(t) if !t.trim().is_empty() => t.parse()?,
            _ => old.kind,
        };
        let name = upd.name.filter(|n| !n.is_empty()).unwrap_or_else(|| old.name.clone());
        let value = upd.value.unwrap_or_else(|| old.value.clone());
        check_name(&name)?;
        check_value(kind, &value)?;
        let k = key(&by.user_id, &old.slug);
        let c = UserConfig { name, kind, value, updated_at: Utc::now(), ..old };
        let batch = Batch::new().require_revision(USER_CONFIGS, &k, rev).put(USER_CONFIGS, &k, value_of(&c)?);
        let batch = audited(batch, actor, "user_config.update", &c)?;
        self.store().commit(batch).await?;
        Ok((c, Written::Updated))
    }

    /// Delete the caller's config `ident` (id or slug).
    pub async fn delete_user_config(&self, by: &Principal, actor: &Actor, ident: &str) -> Result<()> {
        let (c, rev) = self.find_user_config(by, ident).await?;
        let k = key(&by.user_id, &c.slug);
        let batch = Batch::new().require_revision(USER_CONFIGS, &k, rev).delete(USER_CONFIGS, &k);
        let batch = audited(batch, actor, "user_config.delete", &c)?;
        self.store().commit(batch).await?;
        Ok(())
    }

    /// Add the deletion of every config of `user_id` to `batch` (the user is being deleted).
    pub(crate) async fn forget_user_configs(&self, mut batch: Batch, user_id: &str) -> Result<Batch> {
        let prefix = format!("{user_id}:");
        for r in self.store().list(USER_CONFIGS).await? {
            if r.id.starts_with(&prefix) {
                batch = batch.delete(USER_CONFIGS, &r.id);
            }
        }
        Ok(batch)
    }

    async fn own_configs(&self, by: &Principal) -> Result<Vec<(UserConfig, u64)>> {
        let prefix = format!("{}:", by.user_id);
        let mut out = Vec::new();
        for r in self.store().list(USER_CONFIGS).await? {
            if !r.id.starts_with(&prefix) {
                continue;
            }
            let c: UserConfig = serde_json::from_value(r.value)
                .map_err(|e| IdentityError::Internal(format!("stored user config is unreadable: {e}")))?;
            if c.user_id == by.user_id {
                out.push((c, r.revision));
            }
        }
        Ok(out)
    }

    async fn find_user_config(&self, by: &Principal, ident: &str) -> Result<(UserConfig, u64)> {
        self.own_configs(by)
            .await?
            .into_iter()
            .find(|(c, _)| c.id == ident || c.slug.eq_ignore_ascii_case(ident))
            .ok_or_else(|| IdentityError::not_found("User config", ident))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked_against_their_type() {
        assert!(UserConfigType::Bool.check("true").is_ok());
        assert!(UserConfigType::Bool.check("yes").is_err());
        assert!(UserConfigType::Int.check("-42").is_ok());
        assert!(UserConfigType::Int.check("4.2").is_err());
        assert!(UserConfigType::Json.check(r#"{"a":[1]}"#).is_ok());
        assert!(UserConfigType::Json.check("{").is_err());
        assert!(UserConfigType::String.check("anything").is_ok());
        assert_eq!("".parse::<UserConfigType>().ok(), Some(UserConfigType::String));
        assert!("float".parse::<UserConfigType>().is_err());
    }

    #[test]
    fn slugs_are_plain() {
        assert!(check_slug("ui.theme-dark_2").is_ok());
        assert!(check_slug("").is_err());
        assert!(check_slug("a/b").is_err());
        assert!(check_slug("a:b").is_err());
    }
}
