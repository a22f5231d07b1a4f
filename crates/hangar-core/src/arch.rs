//! CPU architectures of images, VMs and hosts: `x86_64` and `arm64`, with the one alias
//! table every part of Hangar parses with (the API, the catalog, the orchestrator).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The architecture an image runs on. Stored and printed by its canonical
/// name; parsed from the canonical names and the aliases `amd64`, `x64`,
/// `x86-64` (for x86_64) and `aarch64`, `arm` (for arm64), in any case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Architecture {
    /// 64-bit x86.
    X86_64,
    /// 64-bit ARM.
    Arm64,
}

impl Architecture {
    /// Every architecture.
    pub const ALL: [Architecture; 2] = [Architecture::X86_64, Architecture::Arm64];

    /// The canonical name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Architecture::X86_64 => "x86_64",
            Architecture::Arm64 => "arm64",
        }
    }

    /// The architecture of the machine this runs on, if it is one we know.
    pub fn host() -> Option<Architecture> {
        std::env::consts::ARCH.parse().ok()
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An architecture name we do not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown architecture {0:?}: use x86_64 (or amd64) or arm64 (or aarch64, arm)")]
pub struct UnknownArchitecture(pub String);

impl FromStr for Architecture {
    type Err = UnknownArchitecture;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "x86_64" | "amd64" | "x64" | "x86-64" => Ok(Architecture::X86_64),
            "arm64" | "aarch64" | "arm" => Ok(Architecture::Arm64),
            _ => Err(UnknownArchitecture(s.to_string())),
        }
    }
}

impl Serialize for Architecture {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Architecture {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn aliases_map_to_canonical_names() {
        let cases = [
            ("x86_64", Architecture::X86_64),
            ("amd64", Architecture::X86_64),
            ("AMD64", Architecture::X86_64),
            (" x64 ", Architecture::X86_64),
            ("x86-64", Architecture::X86_64),
            ("arm64", Architecture::Arm64),
            ("aarch64", Architecture::Arm64),
            ("ARM", Architecture::Arm64),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Architecture>().unwrap(), want, "{input}");
        }
        for bad in ["", "i386", "armv7", "riscv64", "x86"] {
            assert!(bad.parse::<Architecture>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn serialises_canonically_and_reads_aliases() {
        assert_eq!(serde_json::to_string(&Architecture::Arm64).unwrap(), "\"arm64\"");
        let a: Architecture = serde_json::from_str("\"aarch64\"").unwrap();
        assert_eq!(a, Architecture::Arm64);
        assert!(serde_json::from_str::<Architecture>("\"sparc\"").is_err());
        assert_eq!(Architecture::X86_64.to_string(), "x86_64");
    }
}
