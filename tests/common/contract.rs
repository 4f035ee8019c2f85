//! The contract's webhook schemas, checked on a body splitpay emits.

/// The unit test's check in src/events/mod.rs, on a delivered body: the seed's webhook schema for the body's
/// `type`, its required fields, exactly its `data` properties, each of an allowed JSON type and enum value.
pub fn validate_against_contract(body: &serde_json::Value) -> Result<(), String> {
    use serde_json::Value;
    let seed: Value = serde_json::from_str(include_str!("../../contract/together-openapi.json")).unwrap();
    let event_type = body["type"].as_str().ok_or("no type")?;
    let schema = &seed["webhooks"][event_type]["post"]["requestBody"]["content"]["application/json"]["schema"];
    if !schema.is_object() {
        return Err(format!("the contract has no webhook {event_type}"));
    }
    for required in schema["required"].as_array().unwrap() {
        if body.get(required.as_str().unwrap()).is_none() {
            return Err(format!("{event_type}: {required} missing"));
        }
    }
    let props = schema["properties"]["data"]["properties"].as_object().unwrap();
    let data = body["data"].as_object().ok_or("data is not an object")?;
    let mut ours: Vec<_> = data.keys().collect();
    let mut theirs: Vec<_> = props.keys().collect();
    ours.sort();
    theirs.sort();
    if ours != theirs {
        return Err(format!(
            "{event_type}: data fields {ours:?} differ from the contract's {theirs:?}"
        ));
    }
    for (name, prop) in props {
        let allowed: Vec<&str> = match &prop["type"] {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().map(|t| t.as_str().unwrap()).collect(),
            other => return Err(format!("unexpected type {other}")),
        };
        let got = match &data[name] {
            Value::Null => "null",
            Value::String(_) => "string",
            Value::Number(_) => "integer",
            Value::Bool(_) => "boolean",
            _ => "object",
        };
        if !allowed.contains(&got) {
            return Err(format!("{event_type}.{name}: {got} not in {allowed:?}"));
        }
        if let Some(values) = prop["enum"].as_array() {
            if !values.contains(&data[name]) {
                return Err(format!("{event_type}.{name}: value not in the contract's enum"));
            }
        }
    }
    Ok(())
}
