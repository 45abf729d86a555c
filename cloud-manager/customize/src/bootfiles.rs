//! Files from the file database go into the tree. For an OS the target cannot boot as
//! it is (CentOS 5 on AWS), /boot is first set aside in /boot.orig and replaced by the
//! database's boot files; the boot step then edits the new boot loader configuration.
use super::filedb::FileDb;
use super::{Ctx, Target, Tree};

const ASIDE: &str = "/boot.orig";

pub fn step(tree: &mut Tree, ctx: &mut Ctx<'_>) {
    let db = match FileDb::open(ctx.plan.filedb.as_deref()) {
        Ok(db) => db,
        Err(e) => {
            ctx.note("filedb", format!("file database unusable: {e}"));
            return;
        }
    };
    let target = match ctx.plan.target {
        Target::Local => "local",
        Target::Aws => "aws",
        Target::Azure => "azure",
    };
    let needs = db.lookup(&ctx.os.id, &ctx.os.family, &ctx.os.version, target);
    for n in &needs.notes {
        ctx.note("filedb", n.clone());
    }
    let boot_files = needs
        .files
        .iter()
        .filter(|f| f.0.starts_with("/boot/"))
        .count();
    if needs.replace_boot && boot_files == 0 {
        ctx.note(
            "/boot",
            format!(
                "{} {} cannot boot on {target} as it is, and the file database has no boot files for it: add them with `ferry filedb add --replace-boot`",
                ctx.os.id, ctx.os.version
            ),
        );
    } else if needs.replace_boot && !tree.exists(ASIDE) {
        let old = tree.walk("/boot", 100_000);
        for path in &old {
            if let Some((bytes, mode)) = tree.disk_bytes(path) {
                tree.place(&format!("{ASIDE}{}", &path["/boot".len()..]), bytes, mode);
                tree.remove(path);
            }
        }
        ctx.note(
            "/boot",
            format!(
                "{} files set aside in {ASIDE}; boot files from the file database replace them",
                old.len()
            ),
        );
    }
    for (path, sha, mode) in &needs.files {
        match db.object(sha) {
            Ok(data) => {
                match String::from_utf8(data) {
                    // Text goes through the staged view, so later steps (the boot
                    // loader) edit what the database brought.
                    Ok(text) => tree.write_mode(path, text, *mode),
                    Err(e) => tree.place(path, e.into_bytes(), *mode),
                }
                ctx.note(path, format!("from the file database (mode {mode:o})"));
            }
            Err(e) => ctx.note(path, format!("not placed: {e}")),
        }
    }
}
