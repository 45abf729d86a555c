//! `/etc/hosts`: the one parser of it (the probe reads FQDNs from it; customization
//! rewrites it). Lines that are not entries are kept verbatim.
use std::net::IpAddr;

/// One line of a hosts file: an address with names, or anything else kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Entry {
        ip: IpAddr,
        names: Vec<String>,
        raw: String,
    },
    Other(String),
}

pub fn parse(text: &str) -> Vec<Line> {
    text.split_inclusive('\n')
        .map(|raw| {
            let body = raw.split('#').next().unwrap_or_default();
            let mut words = body.split_whitespace();
            match words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                Some(ip) => Line::Entry {
                    ip,
                    names: words.map(str::to_string).collect(),
                    raw: raw.to_string(),
                },
                None => Line::Other(raw.to_string()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: ferry_common::proptest_cases(2000), .. ProptestConfig::default() })]
        #[test]
        fn any_text_round_trips(text in "(?s).{0,400}") {
            let back: String = parse(&text).into_iter().map(|l| match l {
                Line::Entry { raw, .. } | Line::Other(raw) => raw,
            }).collect();
            prop_assert_eq!(back, text);
        }
    }

    #[test]
    fn parse_keeps_every_byte_and_reads_entries() {
        for text in [
            "",
            "127.0.0.1 localhost\n",
            "# c\n::1 a b # x\nbad line\n10.0.0.1\tz",
            "\u{0}\n\n",
        ] {
            let back: String = parse(text)
                .into_iter()
                .map(|l| match l {
                    Line::Entry { raw, .. } | Line::Other(raw) => raw,
                })
                .collect();
            assert_eq!(back, text);
        }
        let lines = parse("10.0.0.1 a.b a # note\n");
        assert!(matches!(&lines[0], Line::Entry { names, .. } if names == &["a.b", "a"]));
    }
}
