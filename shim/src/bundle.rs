//! OCI bundles as `vessel create` reads them: `config.json` parsed and
//! checked, the root filesystem resolved to an absolute path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Why a bundle cannot be used; the messages are what the CLI prints.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The bundle directory is missing or unreadable.
    #[error("bundle {}", path.display())]
    Dir {
        /// Bundle path as given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` cannot be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// Its path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not JSON.
    #[error("{}: invalid JSON: {message}", path.display())]
    Json {
        /// Its path.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// A required field is missing or mistyped, or points nowhere.
    #[error("config.json: {0}")]
    Invalid(String),
}

/// A checked bundle.
#[derive(Clone, Debug)]
pub struct Bundle {
    /// Absolute bundle directory.
    pub dir: PathBuf,
    /// The whole `config.json`.
    pub spec: Value,
    /// Absolute root filesystem directory.
    pub rootfs: PathBuf,
    /// `root.readonly`.
    pub readonly: bool,
    /// `hostname`, if set.
    pub hostname: Option<String>,
    /// `process.terminal`.
    pub terminal: bool,
    /// `annotations` (string values only).
    pub annotations: BTreeMap<String, String>,
}

impl Bundle {
    /// Reads and checks `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
        let abs = std::fs::canonicalize(dir).map_err(|source| BundleError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = abs.join("config.json");
        let text = std::fs::read(&path).map_err(|source| BundleError::Read {
            path: path.clone(),
            source,
        })?;
        let spec: Value = serde_json::from_slice(&text).map_err(|e| BundleError::Json {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Self::from_spec(abs, spec)
    }

    /// Checks an already parsed `config.json` of bundle directory `dir`
    /// (absolute).
    pub fn from_spec(dir: PathBuf, spec: Value) -> Result<Bundle, BundleError> {
        if !spec.is_object() {
            return Err(BundleError::Invalid("not a JSON object".into()));
        }
        let root = spec
            .get("root")
            .and_then(|r| r.get("path"))
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| BundleError::Invalid("root.path is missing".into()))?;
        let rootfs = dir.join(root);
        let rootfs = std::fs::canonicalize(&rootfs)
            .ok()
            .filter(|p| p.is_dir())
            .ok_or_else(|| {
                BundleError::Invalid(format!(
                    "rootfs ({}) does not exist or is not a directory",
                    rootfs.display()
                ))
            })?;
        let readonly = match spec["root"].get("readonly") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(BundleError::Invalid("root.readonly must be a bool".into())),
        };
        let process = spec
            .get("process")
            .filter(|p| p.is_object())
            .ok_or_else(|| BundleError::Invalid("process is missing".into()))?;
        let args_ok = process
            .get("args")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty() && a.iter().all(Value::is_string));
        if !args_ok {
            return Err(BundleError::Invalid(
                "process.args must be a non-empty list of strings".into(),
            ));
        }
        let terminal = process
            .get("terminal")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let hostname = spec
            .get("hostname")
            .and_then(Value::as_str)
            .filter(|h| !h.is_empty())
            .map(str::to_string);
        let annotations = spec
            .get("annotations")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Bundle {
            dir,
            spec,
            rootfs,
            readonly,
            hostname,
            terminal,
            annotations,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vessel-bundle-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("rootfs")).unwrap();
        d
    }

    #[test]
    fn good_and_bad_specs() {
        let d = tmp("specs");
        let good = json!({"root": {"path": "rootfs", "readonly": true},
            "process": {"args": ["sh"]}, "hostname": "h", "annotations": {"a": "b"}});
        let b = Bundle::from_spec(d.clone(), good.clone()).unwrap();
        assert!(b.readonly && !b.terminal);
        assert_eq!(b.rootfs, std::fs::canonicalize(d.join("rootfs")).unwrap());
        assert_eq!(b.hostname.as_deref(), Some("h"));
        assert_eq!(b.annotations["a"], "b");
        for bad in [
            json!([]),
            json!({"process": {"args": ["sh"]}}),
            json!({"root": {"path": "nope"}, "process": {"args": ["sh"]}}),
            json!({"root": {"path": "rootfs"}}),
            json!({"root": {"path": "rootfs"}, "process": {"args": []}}),
            json!({"root": {"path": "rootfs", "readonly": "yes"}, "process": {"args": ["sh"]}}),
        ] {
            assert!(
                matches!(
                    Bundle::from_spec(d.clone(), bad.clone()),
                    Err(BundleError::Invalid(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(Bundle::load(&d), Err(BundleError::Read { .. })));
        std::fs::write(d.join("config.json"), b"{").unwrap();
        assert!(matches!(Bundle::load(&d), Err(BundleError::Json { .. })));
        std::fs::write(d.join("config.json"), good.to_string()).unwrap();
        Bundle::load(&d).unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }
}
