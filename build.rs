//! Rebuilds the crate when a queue migration is added or changed: the
//! migrations are embedded at compile time by `refinery::embed_migrations!`,
//! which does not tell Cargo about the files it reads.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
