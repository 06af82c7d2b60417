//! Generates the Tauri context (config, icons, capabilities) the app embeds.

fn main() {
    tauri_build::build();
}
