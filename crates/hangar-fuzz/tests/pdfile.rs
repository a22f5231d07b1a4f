//! PDFiles: any text, lines made of the real keywords with odd arguments, and mutated real
//! PDFiles parse to a PDFile or an error naming a line, never a panic or a hang.

use hangar_catalog::pdfile;
use hangar_fuzz::{answers, mutated, text};
use proptest::prelude::*;

const KEYWORDS: &[&str] = &[
    "FROM",
    "TO",
    "INSECURE",
    "AUTHENTICATE",
    "USERNAME",
    "PASSWORD",
    "APIKEY",
    "CATALOG_ID",
    "DESCRIPTION",
    "VERSION",
    "ARCHITECTURE",
    "LOCAL_PATH",
    "ROLE",
    "CLAIM",
    "TAG",
    "PROVIDER",
    "MACHINE_NAME",
    "OWNER",
    "DESTINATION",
    "START_AFTER_PULL",
    "CLONE",
    "CLONE_TO",
    "CLONE_ID",
    "EXECUTE",
    "RUN",
    "#",
];

const SAMPLE: &str = "TO http://localhost:3080\nAUTHENTICATE USERNAME root\nAUTHENTICATE PASSWORD ${PASS}\n\
PROVIDER NAME local-storage\nPROVIDER catalog_path=/tmp/catalog\nCATALOG_ID ubuntu\nVERSION 1.0.0\n\
ARCHITECTURE arm64\nLOCAL_PATH /tmp/ubuntu.pvm\nROLE ADMIN\nCLAIM LIST_VM\nTAG ci, linux\nDESCRIPTION A base image\n";

fn line() -> impl Strategy<Value = String> {
    (prop::sample::select(KEYWORDS), prop::collection::vec(text(), 0..4))
        .prop_map(|(k, args)| format!("{k} {}", args.join(" ")))
}

fn parses(text: String) {
    answers("the PDFile parser", move || {
        let env = |name: &str| (name == "PASS").then(|| "secret".to_string());
        let _ = pdfile::parse(&text, &env);
    });
}

proptest! {
    #[test]
    fn any_text(t in text()) {
        parses(t);
    }

    #[test]
    fn keyword_lines(lines in prop::collection::vec(line(), 0..24)) {
        parses(lines.join("\n"));
    }

    #[test]
    fn mutated_pdfile(t in mutated(SAMPLE)) {
        parses(t);
    }
}
