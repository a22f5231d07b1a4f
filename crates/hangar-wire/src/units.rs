//! Values the reference prints or reads in its own ways.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::ToSchema;

/// A size in MiB, printed the reference's way (`"2048Mb"`) and read from that, from other
/// units (`"2 GB"`, `"512 MiB"`, `"1TB"`) or from a plain number of MiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, ToSchema)]
#[schema(value_type = String, example = "2048Mb")]
pub struct Mb(pub u64);

impl Mb {
    /// Parse a size text; `None` names no size we know.
    pub fn parse(text: &str) -> Option<Mb> {
        let t = text.trim().to_ascii_lowercase();
        let digits: String = t.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
        let n: f64 = digits.parse().ok()?;
        let factor = match t[digits.len()..].trim() {
            "" | "m" | "mb" | "mib" => 1.0,
            "k" | "kb" | "kib" => 1.0 / 1024.0,
            "g" | "gb" | "gib" => 1024.0,
            "t" | "tb" | "tib" => 1024.0 * 1024.0,
            _ => return None,
        };
        let v = n * factor;
        (v.is_finite() && v >= 0.0 && v < u64::MAX as f64).then_some(Mb(v as u64))
    }
}

impl fmt::Display for Mb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}Mb", self.0)
    }
}

impl Serialize for Mb {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mb {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Mb;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"2048Mb\", \"2 GB\" or a number of MiB")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Mb, E> {
                Ok(Mb(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Mb, E> {
                u64::try_from(v).map(Mb).map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Mb, E> {
                if v.is_finite() && v >= 0.0 { Ok(Mb(v as u64)) } else { Err(E::custom("a size cannot be negative")) }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Mb, E> {
                Mb::parse(v).ok_or_else(|| E::custom(format!("{v:?} is not a size; use e.g. \"2048Mb\" or \"2 GB\"")))
            }
        }
        d.deserialize_any(V)
    }
}

/// A whole number that clients send as a number or as a string (`2`, `"2"`, `"2048"`);
/// an empty string or `null` is absent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ToSchema)]
#[schema(value_type = String, example = "2")]
pub struct Flexible(pub Option<u64>);

impl Serialize for Flexible {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(v) => s.collect_str(&v),
            None => s.serialize_none(),
        }
    }
}

impl<'de> Deserialize<'de> for Flexible {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Flexible;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a positive whole number, as a number or a string")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Flexible, E> {
                Ok(Flexible(Some(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Flexible, E> {
                u64::try_from(v).map(|v| Flexible(Some(v))).map_err(|_| E::custom("must be a positive whole number"))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Flexible, E> {
                Err(E::custom("must be a positive whole number"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Flexible, E> {
                let t = v.trim();
                if t.is_empty() {
                    return Ok(Flexible(None));
                }
                t.parse().map(|v| Flexible(Some(v))).map_err(|_| E::custom(format!("{v:?} is not a number")))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Flexible, E> {
                Ok(Flexible(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<Flexible, E> {
                Ok(Flexible(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn sizes_round_trip_in_the_reference_shape() {
        assert_eq!(serde_json::to_value(Mb(2048)).unwrap(), json!("2048Mb"));
        for (input, want) in [
            (json!("2048Mb"), 2048),
            (json!("2 GB"), 2048),
            (json!("512 MiB"), 512),
            (json!("1TB"), 1 << 20),
            (json!(512), 512),
            (json!(" 64 mb "), 64),
        ] {
            let got: Mb = serde_json::from_value(input.clone()).unwrap();
            assert_eq!(got, Mb(want), "{input}");
            let again: Mb = serde_json::from_value(serde_json::to_value(got).unwrap()).unwrap();
            assert_eq!(again, got);
        }
        for bad in [json!("junk"), json!("12 parsecs"), json!(-1), json!(true), json!("")] {
            assert!(serde_json::from_value::<Mb>(bad.clone()).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn flexible_numbers_take_numbers_and_strings() {
        for (input, want) in [(json!(2), Some(2)), (json!("2048"), Some(2048)), (json!(""), None), (json!(null), None)]
        {
            assert_eq!(serde_json::from_value::<Flexible>(input.clone()).unwrap(), Flexible(want), "{input}");
        }
        for bad in [json!("two"), json!(-3), json!(1.5), json!([1])] {
            assert!(serde_json::from_value::<Flexible>(bad.clone()).is_err(), "{bad} accepted");
        }
        assert_eq!(serde_json::to_value(Flexible(Some(4))).unwrap(), json!("4"));
    }
}
