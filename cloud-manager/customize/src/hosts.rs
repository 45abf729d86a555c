//! `/etc/hosts`: the one parser of it, and the step that maps every system of the
//! application to its address under its FQDN and each shorter name made by stripping
//! domain labels (patent: "machine.company.corp" -> "machine.company", "machine").
//! Entries for other hosts and comments are kept; the generated lines sit between
//! markers so a second run finds them and changes nothing.
use super::{Ctx, Tree};
use ferry_sysconf::hosts::{parse, Line};
use std::net::IpAddr;

const BEGIN: &str = "# BEGIN ferry: systems of this application";
const END: &str = "# END ferry";

/// A valid host name: labels of letters, digits and hyphens.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// "a.b.corp" -> ["a.b.corp", "a.b", "a"].
pub fn variants(fqdn: &str) -> Vec<String> {
    let labels: Vec<&str> = fqdn.split('.').collect();
    (1..=labels.len())
        .rev()
        .map(|n| labels[..n].join("."))
        .collect()
}

pub fn step(tree: &mut Tree, ctx: &mut Ctx<'_>) {
    if ctx.plan.hosts.is_empty() {
        return;
    }
    let text = match tree.read("/etc/hosts") {
        super::Found::Text(t) => t,
        super::Found::Missing => String::new(),
        super::Found::Skipped(why) => {
            ctx.note("/etc/hosts", format!("skipped: {why}"));
            return;
        }
    };
    let out = generate(&text, &ctx.plan.hosts, ctx);
    tree.write("/etc/hosts", out);
}

fn generate(text: &str, hosts: &[(IpAddr, String)], ctx: &mut Ctx<'_>) -> String {
    let ours: Vec<(IpAddr, Vec<String>)> = hosts
        .iter()
        .map(|(ip, fqdn)| (*ip, variants(fqdn)))
        .collect();
    let taken = |n: &str| {
        ours.iter()
            .any(|(_, v)| v.iter().any(|x| x.eq_ignore_ascii_case(n)))
    };
    let mut out = String::new();
    let mut in_block = false;
    let mut has_localhost = false;
    for line in parse(text) {
        let raw = match &line {
            Line::Entry { raw, .. } | Line::Other(raw) => raw.clone(),
        };
        if raw.trim_end() == BEGIN {
            in_block = true;
            continue;
        }
        if in_block {
            if raw.trim_end() == END {
                in_block = false;
            }
            continue;
        }
        if let Line::Entry { ip, names, .. } = &line {
            if names.iter().any(|n| n == "localhost") {
                has_localhost = true;
            }
            let loopback = ip.is_loopback();
            if !loopback && (ours.iter().any(|(o, _)| o == ip) || names.iter().any(|n| taken(n))) {
                ctx.note(
                    "/etc/hosts",
                    format!("replaced the source's entry {:?}", raw.trim_end()),
                );
                continue;
            }
        }
        out.push_str(&raw);
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    let mut head = String::new();
    if !has_localhost {
        head.push_str("127.0.0.1 localhost.localdomain localhost\n");
        head.push_str("::1 localhost6.localdomain6 localhost6\n");
    }
    let mut block = format!("{BEGIN}\n");
    for (ip, names) in &ours {
        block.push_str(&format!("{ip} {}\n", names.join(" ")));
    }
    block.push_str(END);
    block.push('\n');
    format!("{head}{out}{block}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_strip_domains_as_the_patent_shows() {
        assert_eq!(
            variants("machine.company.corp"),
            ["machine.company.corp", "machine.company", "machine"]
        );
        assert_eq!(variants("db"), ["db"]);
    }
}
