//! Build script: rebuild when a migration is added or changed. `sqlx::migrate!` embeds `migrations/` at compile time,
//! and cargo does not know the macro read that folder, so a new migration alone would not be in the next build.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
