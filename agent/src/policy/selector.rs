//! Label selectors (metav1.LabelSelector) as the API defines them: all
//! `matchLabels` and all `matchExpressions` must hold; an empty selector
//! selects everything.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub type Labels = BTreeMap<String, String>;

pub fn matches(selector: &LabelSelector, labels: &Labels) -> bool {
    let labels_ok = selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|req| {
        let values = req.values.as_deref().unwrap_or_default();
        let value = labels.get(&req.key);
        match req.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            // Rejected by validation; select nothing rather than everything.
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

/// Checks the operators and their value lists, as the API server does.
pub fn validate(selector: &LabelSelector) -> Result<(), String> {
    for req in selector.match_expressions.iter().flatten() {
        let n = req.values.as_ref().map_or(0, Vec::len);
        match req.operator.as_str() {
            "In" | "NotIn" if n == 0 => {
                return Err(format!("operator {} on {:?} needs values", req.operator, req.key));
            }
            "Exists" | "DoesNotExist" if n > 0 => {
                return Err(format!("operator {} on {:?} takes no values", req.operator, req.key));
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => return Err(format!("unknown selector operator {other:?}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(yaml: &str) -> LabelSelector {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn operators() {
        let l = labels(&[("pod", "a"), ("tier", "web")]);
        assert!(matches(&sel("{}"), &l), "empty selects all");
        assert!(matches(&sel("matchLabels: {pod: a}"), &l));
        assert!(!matches(&sel("matchLabels: {pod: b}"), &l));
        assert!(matches(&sel("matchExpressions: [{key: pod, operator: In, values: [a, b]}]"), &l));
        assert!(!matches(&sel("matchExpressions: [{key: pod, operator: NotIn, values: [a]}]"), &l));
        assert!(
            matches(&sel("matchExpressions: [{key: x, operator: NotIn, values: [a]}]"), &l),
            "NotIn holds for a missing key"
        );
        assert!(matches(&sel("matchExpressions: [{key: tier, operator: Exists}]"), &l));
        assert!(matches(&sel("matchExpressions: [{key: x, operator: DoesNotExist}]"), &l));
        assert!(
            !matches(
                &sel("{matchLabels: {pod: a}, matchExpressions: [{key: tier, operator: DoesNotExist}]}"),
                &l
            ),
            "all terms must hold"
        );
    }

    #[test]
    fn validation() {
        assert!(validate(&sel("matchExpressions: [{key: a, operator: In}]")).is_err());
        assert!(validate(&sel("matchExpressions: [{key: a, operator: Exists, values: [x]}]")).is_err());
        assert!(validate(&sel("matchExpressions: [{key: a, operator: Like, values: [x]}]")).is_err());
    }
}
