//! `--source dir:PATH`: Kubernetes manifests in a directory (multi-document
//! YAML or JSON), rescanned every 100 ms. Only changed files are parsed
//! again, so a bad object is reported once per change, not once per scan.

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use serde::Deserialize as _;
use tracing::{debug, warn};

use super::validate;
use crate::cluster::{Cluster, Object};

/// What identifies a version of a file without reading it. Editors and the
/// tests replace files by rename, which changes the inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    mtime_ns: i128,
    len: u64,
    ino: u64,
}

struct ParsedFile {
    stamp: Stamp,
    objects: Vec<Object>,
}

pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, ParsedFile>,
    ticker: tokio::time::Interval,
    delivered: bool,
}

/// How often the directory is rescanned: well inside the 500 ms in which a
/// change must reach the datapath, and cheap (one stat per file).
const SCAN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

fn is_manifest(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

impl DirSource {
    pub fn new(dir: PathBuf) -> Self {
        let mut ticker = tokio::time::interval(SCAN_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self { dir, files: BTreeMap::new(), ticker, delivered: false }
    }

    /// See [`super::Source::changed`]. A directory that cannot be read is
    /// reported and retried; the last state stays in force meanwhile.
    pub async fn changed(&mut self) -> anyhow::Result<Cluster> {
        loop {
            self.ticker.tick().await;
            if self.rescan()? || !self.delivered {
                self.delivered = true;
                return Ok(self.cluster());
            }
        }
    }

    /// Rescans the directory. Returns whether any file was added, changed or
    /// removed since the last scan.
    pub fn rescan(&mut self) -> anyhow::Result<bool> {
        let entries =
            std::fs::read_dir(&self.dir).with_context(|| format!("reading {}", self.dir.display()))?;
        let mut seen = BTreeMap::new();
        for entry in entries {
            let path = entry?.path();
            if !is_manifest(&path) {
                continue;
            }
            // A file may vanish between listing and reading: skip it this time.
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            let stamp = Stamp {
                mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
                len: meta.len(),
                ino: meta.ino(),
            };
            seen.insert(path, stamp);
        }
        let mut changed = false;
        let before = self.files.len();
        self.files.retain(|path, _| seen.contains_key(path));
        changed |= self.files.len() != before;
        for (path, stamp) in seen {
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let objects = match std::fs::read_to_string(&path) {
                Ok(content) => parse_manifests(&path, &content),
                Err(err) => {
                    warn!(file = %path.display(), error = %err, "unreadable file skipped");
                    Vec::new()
                }
            };
            debug!(file = %path.display(), objects = objects.len(), "parsed");
            self.files.insert(path, ParsedFile { stamp, objects });
            changed = true;
        }
        Ok(changed)
    }

    /// Every valid object of every file.
    pub fn cluster(&self) -> Cluster {
        Cluster::from_objects(self.files.values().flat_map(|f| f.objects.iter()))
    }
}

/// Parses one file's documents. Invalid objects are logged with the file and
/// the object's name, and left out.
pub fn parse_manifests(path: &Path, content: &str) -> Vec<Object> {
    let mut objects = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(content).enumerate() {
        let value = match serde_yaml::Value::deserialize(document) {
            Ok(value) => value,
            Err(err) => {
                // After a syntax error the parser cannot resynchronise: the
                // rest of this file is skipped, other files are not affected.
                warn!(file = %path.display(), document = index, error = %err, "YAML error: rest of file skipped");
                break;
            }
        };
        collect(path, value, &mut objects);
    }
    objects
}

fn collect(path: &Path, value: serde_yaml::Value, objects: &mut Vec<Object>) {
    if value.is_null() {
        return;
    }
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_owned();
    let api_version = value.get("apiVersion").and_then(|k| k.as_str()).unwrap_or("").to_owned();
    let meta = value.get("metadata");
    let field = |name: &str| meta.and_then(|m| m.get(name)).and_then(|v| v.as_str()).unwrap_or("").to_owned();
    let object_name = match field("namespace").as_str() {
        "" => format!("{kind} {}", field("name")),
        namespace => format!("{kind} {namespace}/{}", field("name")),
    };
    let parsed = match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            for item in value.get("items").and_then(|i| i.as_sequence()).into_iter().flatten() {
                collect(path, item.clone(), objects);
            }
            return;
        }
        ("v1", "Service") => serde_yaml::from_value(value)
            .map_err(|e| e.to_string())
            .and_then(|o| validate::service(&o).map(|()| Object::Service(Arc::new(o)))),
        ("discovery.k8s.io/v1", "EndpointSlice") => serde_yaml::from_value(value)
            .map_err(|e| e.to_string())
            .and_then(|o| validate::endpoint_slice(&o).map(|()| Object::EndpointSlice(Arc::new(o)))),
        ("v1", "Pod") => serde_yaml::from_value(value)
            .map_err(|e| e.to_string())
            .and_then(|o| validate::pod(&o).map(|()| Object::Pod(Arc::new(o)))),
        ("v1", "Namespace") => {
            serde_yaml::from_value(value).map_err(|e| e.to_string()).map(|o| Object::Namespace(Arc::new(o)))
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => serde_yaml::from_value(value)
            .map_err(|e| e.to_string())
            .and_then(|o| validate::network_policy(&o).map(|()| Object::NetworkPolicy(Arc::new(o)))),
        ("v1", "Node") => serde_yaml::from_value(value)
            .map_err(|e| e.to_string())
            .and_then(|o| validate::node(&o).map(|()| Object::Node(Arc::new(o)))),
        _ => Err(format!("unsupported kind {kind:?} (apiVersion {api_version:?})")),
    };
    match parsed {
        Ok(object) => objects.push(object),
        Err(error) => {
            warn!(file = %path.display(), object = %object_name, %error, "invalid object skipped")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: bad-ip, namespace: default}
spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cm}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.0.2]}]
ports: [{port: 8080}]
"#;

    #[test]
    fn bad_objects_are_skipped_and_good_ones_kept() {
        let objects = parse_manifests(Path::new("x.yaml"), GOOD);
        assert_eq!(objects.len(), 2);
        assert!(matches!(objects[0], Object::Service(_)));
        assert!(matches!(objects[1], Object::EndpointSlice(_)));
    }

    #[test]
    fn nodes_are_read_and_bad_ones_skipped() {
        let content = r#"
apiVersion: v1
kind: Node
metadata: {name: n1, labels: {topology.kubernetes.io/zone: zone-a}}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
status: {addresses: [{type: InternalIP, address: 192.0.2.300}]}
"#;
        let objects = parse_manifests(Path::new("nodes.yaml"), content);
        assert_eq!(objects.len(), 1, "the Node with a bad address is skipped");
        let cluster = Cluster::from_objects(&objects);
        assert_eq!(cluster.zone_of("n1"), Some("zone-a"));
        assert_eq!(cluster.zone_of("n2"), None);
    }

    #[test]
    fn a_syntax_error_keeps_the_documents_before_it() {
        let content = format!("{GOOD}---\nkind: [unclosed\n");
        assert_eq!(parse_manifests(Path::new("x.yaml"), &content).len(), 2);
    }

    #[tokio::test]
    async fn rescan_sees_additions_changes_and_removals() {
        let dir = std::env::temp_dir().join(format!("weir-dir-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut source = DirSource::new(dir.clone());
        assert!(!source.rescan().unwrap());
        std::fs::write(dir.join("a.yaml"), GOOD).unwrap();
        assert!(source.rescan().unwrap());
        assert_eq!(source.cluster().services.len(), 1);
        assert!(!source.rescan().unwrap(), "no change, no work");
        std::fs::write(dir.join("a.yaml.tmp"), GOOD.replace("10.96.0.10", "10.96.0.11")).unwrap();
        std::fs::rename(dir.join("a.yaml.tmp"), dir.join("a.yaml")).unwrap();
        assert!(source.rescan().unwrap());
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        assert!(source.rescan().unwrap());
        assert!(source.cluster().services.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
