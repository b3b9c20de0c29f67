//! Reading a process's configuration: the file (`--config` or `TANJIREN_CONFIG`)
//! and the `TANJIREN_*` environment variables, layered over the defaults by the
//! pure [`Config::layered`]; and the operator token a CLI or worker uses.

use std::path::{Path, PathBuf};
use tanjiren_shared::config::{Config, ConfigError};

/// Defaults → `file` (or `$TANJIREN_CONFIG`, if given) → `TANJIREN_*` from the
/// process environment.
///
/// # Errors
/// [`ConfigError`]: the file cannot be read or parsed, a variable does not parse,
/// or a rule of [`Config::layered`] is broken.
pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
    let file = file
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("TANJIREN_CONFIG").map(Into::into));
    let text = match &file {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
            path: p.display().to_string(),
            source,
        })?),
        None => None,
    };
    Config::layered(text.as_deref(), file.as_deref(), |k| std::env::var(k).ok())
}

/// The user's configuration directory: `$XDG_CONFIG_HOME`, else `~/.config`, else `.`.
pub fn config_home() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where `config`'s token lives when it is not given directly ([`Config::token_path`]).
pub fn token_path(config: &Config) -> PathBuf {
    config.token_path(&config_home())
}

/// The token: `token` if set, else the trimmed contents of the token file (None
/// when neither holds one).
pub fn resolve_token(config: &Config) -> Option<String> {
    if !config.token.is_empty() {
        return Some(config.token.clone());
    }
    let t = std::fs::read_to_string(token_path(config)).ok()?;
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}
