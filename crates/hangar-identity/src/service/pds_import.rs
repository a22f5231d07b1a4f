//! Import of the reference service's identity records (`hangar db import-pds`): users with
//! their bcrypt password hashes, roles, claims and API keys, written in one store batch with
//! one audit entry. The parsing of the reference's `data.json` lives in the binary
//! (`crates/hangar/src/import_pds.rs`); this module decides what changes.
//!
//! Imported password and API-key hashes keep the reference's form (see
//! [`password::pds_bcrypt_hash`]); `login` and the API-key check verify them and replace them
//! with Hangar's own hash on first success.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use hangar_core::audit::Actor;
use hangar_core::claims::{ALL_SYSTEM_CLAIMS, DEFAULT_ROLES};
use hangar_store::Batch;
use serde::Serialize;
use serde_json::json;

use super::{Identity, audit, check_email, check_username, from_value, normalise_name, now, to_value};
use crate::error::{IdentityError, Result};
use crate::model::*;
use crate::password;

/// A user of the reference.
#[derive(Debug, Clone)]
pub struct ImportedUser {
    /// The reference's id (API keys point at it).
    pub id: String,
    pub username: String,
    pub name: String,
    pub email: String,
    /// [`password::pds_bcrypt_hash`] of the reference's hash.
    pub password_hash: String,
    pub roles: Vec<String>,
    pub claims: Vec<String>,
    pub created_at: Option<DateTime<Utc>>,
}

/// A role of the reference.
#[derive(Debug, Clone)]
pub struct ImportedRole {
    pub name: String,
    pub description: String,
    pub claims: Vec<String>,
}

/// A claim of the reference.
#[derive(Debug, Clone)]
pub struct ImportedClaim {
    pub name: String,
    pub description: String,
    pub group: String,
    pub resource: String,
    pub action: String,
}

/// An API key of the reference.
#[derive(Debug, Clone)]
pub struct ImportedApiKey {
    pub id: String,
    pub name: String,
    pub key: String,
    /// [`password::pds_bcrypt_hash`] of the reference's hash.
    pub secret_hash: String,
    /// The reference's user id; `None` for a key with no user (the reference ran those as root).
    pub user_id: Option<String>,
    pub revoked: bool,
    pub revoked_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: Option<DateTime<Utc>>,
}

/// Everything to import, and the service user that receives keys with no user.
#[derive(Debug, Clone, Default)]
pub struct IdentityImport {
    pub users: Vec<ImportedUser>,
    pub roles: Vec<ImportedRole>,
    pub claims: Vec<ImportedClaim>,
    pub api_keys: Vec<ImportedApiKey>,
    /// Username of the service user for keys with no user.
    pub service_user: String,
    /// Its roles (explicit: the reference gave such keys root's rights).
    pub service_roles: Vec<String>,
}

/// What happened to one kind of record, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KindReport {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub unchanged: Vec<String>,
    /// The reference's seeded records, mapped onto Hangar's own.
    pub mapped: Vec<String>,
    /// Existing records that differ (written only with `force`).
    pub conflicts: Vec<String>,
}

impl KindReport {
    fn changes(&self) -> usize {
        self.created.len() + self.updated.len()
    }
}

/// What [`Identity::import_pds`] did (or would do, for a dry run).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IdentityImportReport {
    pub users: KindReport,
    pub roles: KindReport,
    pub claims: KindReport,
    pub api_keys: KindReport,
    /// The service user that received keys with no user, its roles and those keys' names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_user: Option<ServiceUserReport>,
}

/// The service user made for keys that had no user.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ServiceUserReport {
    pub username: String,
    pub roles: Vec<String>,
    pub api_keys: Vec<String>,
}

impl IdentityImportReport {
    /// Every conflict, as `kind name`.
    pub fn conflicts(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (kind, r) in
            [("user", &self.users), ("role", &self.roles), ("claim", &self.claims), ("api key", &self.api_keys)]
        {
            out.extend(r.conflicts.iter().map(|n| format!("{kind} {n}")));
        }
        out
    }

    /// How many records are created or updated.
    pub fn changes(&self) -> usize {
        self.users.changes() + self.roles.changes() + self.claims.changes() + self.api_keys.changes()
    }
}

fn sorted(v: &[String]) -> Vec<String> {
    let s: BTreeSet<String> = v.iter().cloned().collect();
    s.into_iter().collect()
}

/// The writes of a new user (as `Identity::user_insert_batch`), added to `batch`.
fn insert_user(batch: Batch, user: &StoredUser) -> Result<Batch> {
    let uname = user.username.to_lowercase();
    let email = user.email.to_lowercase();
    Ok(batch
        .require_absent(USER_NAMES, &uname)
        .require_absent(USER_EMAILS, &email)
        .require_absent(USERS, &user.id)
        .put(USERS, &user.id, to_value(user)?)
        .put(USER_NAMES, &uname, json!(user.id))
        .put(USER_EMAILS, &email, json!(user.id)))
}

fn is_seeded_role(n: &str) -> bool {
    DEFAULT_ROLES.contains(&n)
}

fn is_system_claim(n: &str) -> bool {
    ALL_SYSTEM_CLAIMS.contains(&n)
}

impl Identity {
    /// Import the reference's identity records. With conflicts and without `force`, or with
    /// `dry_run`, nothing is written and the report says what would happen. Records equal
    /// to what is stored are left alone (a second run changes nothing); a password or API
    /// key secret already re-hashed by Hangar is never put back to the reference's hash.
    pub async fn import_pds(
        &self,
        actor: &Actor,
        input: IdentityImport,
        force: bool,
        dry_run: bool,
    ) -> Result<IdentityImportReport> {
        let t = now();
        let mut report = IdentityImportReport::default();
        let mut batch = Batch::new();

        // ----- claims: the reference's seeded ones map onto Hangar's; others are created.
        let mut claims: BTreeMap<String, ImportedClaim> = BTreeMap::new();
        for c in &input.claims {
            let n = normalise_name("claim", &c.name)?;
            claims.insert(n, c.clone());
        }
        let mut extra = |n: &str| -> Result<String> {
            let n = normalise_name("claim", n)?;
            claims.entry(n.clone()).or_insert_with(|| ImportedClaim {
                name: n.clone(),
                description: String::new(),
                group: String::new(),
                resource: String::new(),
                action: String::new(),
            });
            Ok(n)
        };
        for r in &input.roles {
            for c in &r.claims {
                extra(c)?;
            }
        }
        for u in &input.users {
            for c in &u.claims {
                extra(c)?;
            }
        }
        for (n, c) in &claims {
            if is_system_claim(n) {
                report.claims.mapped.push(n.clone());
                continue;
            }
            if self.claim(n).await?.is_some() {
                report.claims.unchanged.push(n.clone());
                continue;
            }
            let claim = Claim {
                id: n.clone(),
                name: n.clone(),
                description: c.description.clone(),
                internal: false,
                group: if c.group.is_empty() { "Custom".into() } else { c.group.clone() },
                resource: c.resource.clone(),
                action: c.action.clone(),
                created_at: t,
                updated_at: t,
            };
            batch = batch.require_absent(CLAIMS, n).put(CLAIMS, n, to_value(&claim)?);
            report.claims.created.push(n.clone());
        }

        // ----- roles: seeded ones map onto Hangar's; custom ones are created.
        let mut roles: BTreeMap<String, ImportedRole> = BTreeMap::new();
        for r in &input.roles {
            roles.insert(normalise_name("role", &r.name)?, r.clone());
        }
        for u in &input.users {
            for r in &u.roles {
                let n = normalise_name("role", r)?;
                roles.entry(n.clone()).or_insert_with(|| ImportedRole {
                    name: n,
                    description: String::new(),
                    claims: vec![],
                });
            }
        }
        for (n, r) in &roles {
            if is_seeded_role(n) {
                report.roles.mapped.push(n.clone());
                continue;
            }
            let wanted = sorted(&r.claims.iter().map(|c| normalise_name("claim", c)).collect::<Result<Vec<_>>>()?);
            match self.role(n).await? {
                Some((existing, rev)) => {
                    if sorted(&existing.claims) == wanted {
                        report.roles.unchanged.push(n.clone());
                    } else {
                        report.roles.conflicts.push(n.clone());
                        if force {
                            let updated = Role { claims: wanted, updated_at: t, ..existing };
                            batch = batch.require_revision(ROLES, n, rev).put(ROLES, n, to_value(&updated)?);
                            report.roles.updated.push(n.clone());
                        }
                    }
                }
                None => {
                    let role = Role {
                        id: n.clone(),
                        name: n.clone(),
                        description: r.description.clone(),
                        internal: false,
                        claims: wanted,
                        created_at: t,
                        updated_at: t,
                    };
                    batch = batch.require_absent(ROLES, n).put(ROLES, n, to_value(&role)?);
                    report.roles.created.push(n.clone());
                }
            }
        }

        // ----- users
        // The reference's user id -> the Hangar id its keys must point at.
        let mut user_ids: BTreeMap<String, String> = BTreeMap::new();
        for u in &input.users {
            let username = check_username(&u.username)?;
            let email = check_email(&u.email)?;
            if !password::is_pds_hash(&u.password_hash) {
                return Err(IdentityError::Invalid(format!(
                    "user {username}: the password hash is not a reference hash"
                )));
            }
            let wanted_roles = sorted(&u.roles.iter().map(|r| normalise_name("role", r)).collect::<Result<Vec<_>>>()?);
            let wanted_claims =
                sorted(&u.claims.iter().map(|c| normalise_name("claim", c)).collect::<Result<Vec<_>>>()?);
            let by_id = self.load_user_by_id(&u.id).await?;
            let by_name = self.find_user_rev(&username).await?.filter(|(x, _)| x.id != u.id);
            let by_email = self.find_user_rev(&email).await?.filter(|(x, _)| x.id != u.id);
            let existing = by_id.or(by_name.clone()).or(by_email.clone());
            let Some((old, rev)) = existing else {
                let who = NewUserIds {
                    id: u.id.clone(),
                    username: username.clone(),
                    name: u.name.clone(),
                    email: email.clone(),
                };
                let user = StoredUser {
                    created_at: u.created_at.unwrap_or(t),
                    ..StoredUser::new(who, u.password_hash.clone(), wanted_roles, wanted_claims, t)
                };
                batch = insert_user(batch, &user)?;
                user_ids.insert(u.id.clone(), user.id.clone());
                report.users.created.push(username);
                continue;
            };
            user_ids.insert(u.id.clone(), old.id.clone());
            // A hash Hangar already replaced (the user logged in since) stays.
            let same_password = !password::is_pds_hash(&old.password_hash) || old.password_hash == u.password_hash;
            let same = old.id == u.id
                && old.username == username
                && old.email.eq_ignore_ascii_case(&email)
                && old.name == u.name
                && sorted(&old.roles) == wanted_roles
                && sorted(&old.claims) == wanted_claims
                && same_password;
            if same {
                report.users.unchanged.push(username);
                continue;
            }
            report.users.conflicts.push(username.clone());
            if !force {
                continue;
            }
            // Overwrite the record found (keeping its id) with the reference's.
            if by_name.is_some()
                && by_email.is_some()
                && by_name.as_ref().map(|x| &x.0.id) != by_email.as_ref().map(|x| &x.0.id)
            {
                return Err(IdentityError::Conflict(format!(
                    "user {username}: its username and its email belong to two different users here; \
                     delete one of them first"
                )));
            }
            let mut user = old.clone();
            user.username = username.clone();
            user.email = email.clone();
            user.name = u.name.clone();
            user.roles = wanted_roles;
            user.claims = wanted_claims;
            user.password_hash = u.password_hash.clone();
            user.security_stamp = uuid::Uuid::new_v4().to_string();
            user.updated_at = t;
            batch = batch.require_revision(USERS, &old.id, rev).put(USERS, &old.id, to_value(&user)?);
            let (old_name, new_name) = (old.username.to_lowercase(), username.to_lowercase());
            if old_name != new_name {
                batch = batch.delete(USER_NAMES, &old_name).require_absent(USER_NAMES, &new_name).put(
                    USER_NAMES,
                    &new_name,
                    json!(old.id),
                );
            }
            let (old_mail, new_mail) = (old.email.to_lowercase(), email.to_lowercase());
            if old_mail != new_mail {
                batch = batch.delete(USER_EMAILS, &old_mail).require_absent(USER_EMAILS, &new_mail).put(
                    USER_EMAILS,
                    &new_mail,
                    json!(old.id),
                );
            }
            report.users.updated.push(username);
        }

        // ----- the service user for keys with no user
        let orphans: Vec<&ImportedApiKey> = input.api_keys.iter().filter(|k| k.user_id.is_none()).collect();
        let mut service_id = None;
        if !orphans.is_empty() {
            let username = check_username(&input.service_user)?;
            let roles =
                sorted(&input.service_roles.iter().map(|r| normalise_name("role", r)).collect::<Result<Vec<_>>>()?);
            match self.find_user_rev(&username).await? {
                Some((old, _)) if sorted(&old.roles) == roles => {
                    report.users.unchanged.push(username.clone());
                    service_id = Some(old.id);
                }
                Some((old, rev)) => {
                    report.users.conflicts.push(username.clone());
                    if force {
                        let user = StoredUser { roles: roles.clone(), updated_at: t, ..old.clone() };
                        batch = batch.require_revision(USERS, &old.id, rev).put(USERS, &old.id, to_value(&user)?);
                        report.users.updated.push(username.clone());
                    }
                    service_id = Some(old.id);
                }
                None => {
                    // A password nobody knows: the user is reached through its keys only.
                    let hash = self.hash_password(password::generate()?).await?;
                    let who = NewUserIds {
                        id: uuid::Uuid::now_v7().to_string(),
                        username: username.clone(),
                        name: "Reference API keys with no user".into(),
                        email: format!("{username}@localhost"),
                    };
                    let user = StoredUser::new(who, hash, roles.clone(), vec![], t);
                    batch = insert_user(batch, &user)?;
                    report.users.created.push(username.clone());
                    service_id = Some(user.id);
                }
            }
            report.service_user =
                Some(ServiceUserReport { username, roles, api_keys: orphans.iter().map(|k| k.name.clone()).collect() });
        }

        // ----- API keys
        for k in &input.api_keys {
            let key = k.key.trim().to_ascii_uppercase();
            if key.is_empty() || key.contains(':') {
                return Err(IdentityError::Invalid(format!("API key {:?}: the key is empty or has a ':'", k.name)));
            }
            if !password::is_pds_hash(&k.secret_hash) {
                return Err(IdentityError::Invalid(format!(
                    "API key {:?}: the secret is not a reference hash",
                    k.name
                )));
            }
            let user_id = match &k.user_id {
                None => service_id.clone().unwrap_or_default(),
                Some(pds) => match user_ids.get(pds) {
                    Some(id) => id.clone(),
                    None => match self.load_user_by_id(pds).await? {
                        Some((u, _)) => u.id,
                        None => {
                            return Err(IdentityError::Invalid(format!(
                                "API key {:?} belongs to user id {pds:?}, which is not in the file",
                                k.name
                            )));
                        }
                    },
                },
            };
            let stored = StoredApiKey {
                id: k.id.clone(),
                name: k.name.clone(),
                key: key.clone(),
                secret_hash: k.secret_hash.clone(),
                user_id,
                revoked: k.revoked,
                revoked_at: k.revoked_at,
                expires_at: k.expires_at,
                created_at: k.created_at.unwrap_or(t),
                updated_at: t,
            };
            let indexed = self.inner.store.get(API_KEY_INDEX, &key).await?;
            let indexed_id = indexed.as_ref().and_then(|r| r.value.as_str().map(String::from));
            let existing = self.inner.store.get(API_KEYS, &k.id).await?;
            match (existing, indexed_id) {
                (None, None) => {
                    batch = batch
                        .require_absent(API_KEYS, &k.id)
                        .require_absent(API_KEY_INDEX, &key)
                        .put(API_KEYS, &k.id, to_value(&stored)?)
                        .put(API_KEY_INDEX, &key, json!(k.id));
                    report.api_keys.created.push(k.name.clone());
                }
                (Some(rec), Some(idx)) if idx == k.id => {
                    let old: StoredApiKey = from_value(rec.value, "api key")?;
                    let same_secret = !password::is_pds_hash(&old.secret_hash) || old.secret_hash == stored.secret_hash;
                    let same = old.name == stored.name
                        && old.key == stored.key
                        && old.user_id == stored.user_id
                        && old.revoked == stored.revoked
                        && old.expires_at == stored.expires_at
                        && same_secret;
                    if same {
                        report.api_keys.unchanged.push(k.name.clone());
                    } else {
                        report.api_keys.conflicts.push(k.name.clone());
                        if force {
                            batch = batch.require_revision(API_KEYS, &k.id, rec.revision).put(
                                API_KEYS,
                                &k.id,
                                to_value(&stored)?,
                            );
                            report.api_keys.updated.push(k.name.clone());
                        }
                    }
                }
                (existing, indexed_id) => {
                    // The id or the key is taken by another key here.
                    report.api_keys.conflicts.push(k.name.clone());
                    if force {
                        if let Some(other) = indexed_id.filter(|i| *i != k.id) {
                            batch = batch.delete(API_KEYS, &other);
                        }
                        if let Some(rec) = existing {
                            let old: StoredApiKey = from_value(rec.value, "api key")?;
                            if old.key != key {
                                batch = batch.delete(API_KEY_INDEX, &old.key);
                            }
                        }
                        batch = batch.put(API_KEYS, &k.id, to_value(&stored)?).put(API_KEY_INDEX, &key, json!(k.id));
                        report.api_keys.updated.push(k.name.clone());
                    }
                }
            }
        }

        let blocked = !force && !report.conflicts().is_empty();
        if dry_run || blocked || report.changes() == 0 {
            return Ok(report);
        }
        let detail = json!({
            "users": report.users.created.len() + report.users.updated.len(),
            "roles": report.roles.created.len() + report.roles.updated.len(),
            "claims": report.claims.created.len(),
            "api_keys": report.api_keys.created.len() + report.api_keys.updated.len(),
        });
        let batch = audit(batch, actor, "identity.import_pds", "system", "identity", detail)?;
        self.commit(batch).await?;
        Ok(report)
    }
}
