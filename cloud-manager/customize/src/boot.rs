//! The boot-loader step: GRUB legacy (`menu.lst`/`grub.conf`), GRUB 2 (`/etc/default/grub`
//! and every generated `grub.cfg`, BIOS and EFI), and BLS entries all get the command line
//! `cmdline` makes, so the image boots with its root found by UUID and a serial console.
use super::cmdline::{self, Want};
use super::{Ctx, Tree};
use ferry_sysconf::shell_unquote;

const GRUB_LEGACY: &[&str] = &["/boot/grub/menu.lst", "/boot/grub/grub.conf"];
const GRUB_DEFAULTS: &str = "/etc/default/grub";

pub fn step(tree: &mut Tree, ctx: &mut Ctx<'_>) {
    let want = Want {
        target: ctx.plan.target,
        pin_eth_names: super::net::uses_eth_names(tree),
        console: true,
    };
    for path in GRUB_LEGACY {
        edit_lines(tree, ctx, path, want, |l| {
            let t = l.trim_start();
            t.starts_with("kernel ") || t.starts_with("kernel\t")
        });
    }
    let mut cfgs: Vec<String> = vec!["/boot/grub/grub.cfg".into(), "/boot/grub2/grub.cfg".into()];
    for vendor in tree.list("/boot/efi/EFI", |_| true) {
        cfgs.push(format!("{vendor}/grub.cfg"));
    }
    for path in &cfgs {
        edit_lines(tree, ctx, path, want, |l| {
            let t = l.trim_start();
            ["linux ", "linux16 ", "linuxefi ", "linux\t"]
                .iter()
                .any(|k| t.starts_with(k))
        });
    }
    for entry in tree.list("/boot/loader/entries", |n| n.ends_with(".conf")) {
        edit_lines(tree, ctx, &entry, want, |l| l.starts_with("options "));
    }
    if let Some(text) = ctx.read(tree, GRUB_DEFAULTS) {
        let out = grub_defaults(&text, want, ctx);
        tree.write(GRUB_DEFAULTS, out);
    }
}

/// Edits the command line on every line `is_boot_line` picks: the words after the first
/// two (keyword and kernel path) for kernel lines, after the keyword for `options`.
fn edit_lines(
    tree: &mut Tree,
    ctx: &mut Ctx<'_>,
    path: &str,
    want: Want,
    is_boot_line: impl Fn(&str) -> bool,
) {
    let Some(text) = ctx.read(tree, path) else {
        return;
    };
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches('\n');
        if !is_boot_line(body) {
            out.push_str(line);
            continue;
        }
        let lead = &body[..body.len() - body.trim_start().len()];
        let mut words = body.split_whitespace();
        let keyword = words.next().unwrap_or_default();
        let head = if keyword == "options" {
            keyword.to_string()
        } else {
            format!("{keyword} {}", words.next().unwrap_or_default())
        };
        let args: Vec<&str> = words.collect();
        let args = args.join(" ");
        let new = cmdline::edit(&args, want, path, ctx);
        if new == args {
            out.push_str(line);
        } else {
            out.push_str(&format!("{lead}{head} {new}"));
            out.push_str(&line[body.len()..]);
        }
    }
    tree.write(path, out);
}

/// `GRUB_CMDLINE_LINUX` gets the command-line edits; a serial terminal is added.
fn grub_defaults(text: &str, want: Want, ctx: &mut Ctx<'_>) -> String {
    let mut out = String::new();
    let mut seen_terminal = false;
    let mut seen_serial = false;
    let mut seen_cmdline = false;
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches('\n');
        let Some((key, value)) = body.split_once('=') else {
            out.push_str(line);
            continue;
        };
        let key = key.trim();
        match key {
            "GRUB_CMDLINE_LINUX" | "GRUB_CMDLINE_LINUX_DEFAULT" => {
                let args = shell_unquote(value.trim());
                // The console and pins go once, into GRUB_CMDLINE_LINUX.
                let want = if key == "GRUB_CMDLINE_LINUX" {
                    seen_cmdline = true;
                    want
                } else {
                    Want {
                        pin_eth_names: false,
                        console: false,
                        ..want
                    }
                };
                let new = cmdline::edit(&args, want, GRUB_DEFAULTS, ctx);
                if new == args {
                    out.push_str(line);
                } else {
                    out.push_str(&format!("{key}=\"{new}\"\n"));
                }
            }
            "GRUB_TERMINAL" | "GRUB_TERMINAL_OUTPUT" => {
                seen_terminal = true;
                let v = shell_unquote(value.trim());
                if v.split_whitespace().any(|t| t == "serial") {
                    out.push_str(line);
                } else {
                    // A graphical terminal shows nothing on a serial line.
                    out.push_str(&format!("{key}=\"serial console\"\n"));
                }
            }
            "GRUB_SERIAL_COMMAND" => {
                seen_serial = true;
                out.push_str(line);
            }
            _ => out.push_str(line),
        }
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    if !seen_cmdline {
        let new = cmdline::edit("", want, GRUB_DEFAULTS, ctx);
        out.push_str(&format!("GRUB_CMDLINE_LINUX=\"{new}\"\n"));
    }
    if !seen_terminal {
        out.push_str("GRUB_TERMINAL=\"serial console\"\n");
    }
    if !seen_serial {
        out.push_str("GRUB_SERIAL_COMMAND=\"serial --speed=115200 --unit=0 --word=8 --parity=no --stop=1\"\n");
    }
    out
}
