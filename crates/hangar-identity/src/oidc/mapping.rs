//! From a provider's claims to Hangar role or claim names.
//!
//! Syntax: `rule,rule,...`, each `[claim:]value=NAME[|NAME...]`. Without `claim:` the value
//! is looked up in the groups claim. `value` `*` matches anyone the provider vouches for.
//! A claim holding a list matches when any element equals the value; `scope` is split on
//! spaces. Example: `admins=SUPER_USER,email:ci@example.com=USER,*=USER`.

use serde_json::Value;

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingRule {
    /// The claim looked at; `None` for the groups claim.
    pub claim: Option<String>,
    pub value: String,
    pub names: Vec<String>,
}

/// A list of rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mapping(pub Vec<MappingRule>);

impl Mapping {
    pub fn parse(s: &str) -> Result<Mapping, String> {
        let mut rules = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (lhs, rhs) =
                part.rsplit_once('=').ok_or_else(|| format!("{part:?} is not 'value=NAME' or 'claim:value=NAME'"))?;
            let (claim, value) = match lhs.split_once(':') {
                Some((c, v)) => (Some(c.trim().to_string()), v.trim().to_string()),
                None => (None, lhs.trim().to_string()),
            };
            let names: Vec<String> = rhs
                .split('|')
                .map(|n| n.trim().to_ascii_uppercase().replace(['-', ' '], "_"))
                .filter(|n| !n.is_empty())
                .collect();
            if value.is_empty() || names.is_empty() {
                return Err(format!("{part:?} has an empty value or name"));
            }
            if let Some(bad) =
                names.iter().find(|n| n.len() > 64 || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            {
                return Err(format!("{bad:?} in {part:?} is not a role or claim name"));
            }
            rules.push(MappingRule { claim, value, names });
        }
        Ok(Mapping(rules))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The names the claims map to, deduplicated, in rule order.
    pub fn apply(&self, claims: &serde_json::Map<String, Value>, groups_claim: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in &self.0 {
            let claim = r.claim.as_deref().unwrap_or(groups_claim);
            let hit = r.value == "*" || values(claims.get(claim), claim).contains(&r.value);
            if hit {
                for n in &r.names {
                    if !out.contains(n) {
                        out.push(n.clone());
                    }
                }
            }
        }
        out
    }
}

fn values(v: Option<&Value>, claim: &str) -> Vec<String> {
    match v {
        Some(Value::String(s)) if claim == "scope" || claim == "scp" => {
            s.split_whitespace().map(String::from).collect()
        }
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Bool(b)) => vec![b.to_string()],
        Some(Value::Number(n)) => vec![n.to_string()],
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(String::from)).collect(),
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn rules_match_groups_claims_and_scopes() {
        let m = Mapping::parse("admins=SUPER_USER, email:a@x.io=admin|user ,scope:hangar.read=USER").unwrap();
        let c = json!({"groups": ["devs", "admins"], "email": "a@x.io", "scope": "openid hangar.read"});
        assert_eq!(m.apply(c.as_object().unwrap(), "groups"), vec!["SUPER_USER", "ADMIN", "USER"]);
        let c = json!({"groups": "devs"});
        assert!(m.apply(c.as_object().unwrap(), "groups").is_empty());
        let star = Mapping::parse("*=USER").unwrap();
        assert_eq!(star.apply(json!({}).as_object().unwrap(), "groups"), vec!["USER"]);
        assert!(Mapping::parse("nothing").is_err());
        assert!(Mapping::parse("a=bad name!").is_err());
        assert!(Mapping::parse("").unwrap().is_empty());
    }
}
