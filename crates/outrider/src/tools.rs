//! The built-in tools an agent may be given, by name.
//!
//! Each tool has a JSON schema the model sees and a pure function that runs
//! it. Tools make no network requests: an agent can reach nothing an
//! operator did not build in.

use serde_json::{json, Value};

/// A built-in tool.
pub struct Tool {
    pub name: &'static str,
    pub description: &'static str,
    /// JSON schema of the arguments, as sent to the model.
    pub parameters: fn() -> Value,
    pub run: fn(&Value) -> Result<Value, String>,
}

const TOOLS: &[Tool] = &[
    Tool {
        name: "echo",
        description: "Returns the given text unchanged.",
        parameters: || {
            json!({
                "type": "object",
                "properties": {"text": {"type": "string"}},
                "required": ["text"],
                "additionalProperties": false,
            })
        },
        run: echo,
    },
    Tool {
        name: "add",
        description: "Adds a list of numbers and returns the sum.",
        parameters: || {
            json!({
                "type": "object",
                "properties": {"numbers": {"type": "array", "items": {"type": "number"}}},
                "required": ["numbers"],
                "additionalProperties": false,
            })
        },
        run: add,
    },
    Tool {
        name: "current_time",
        description: "Returns the current UTC time in RFC 3339 form.",
        parameters: || json!({"type": "object", "properties": {}, "additionalProperties": false}),
        run: current_time,
    },
];

/// The tool with this name, if there is one.
pub fn find(name: &str) -> Option<&'static Tool> {
    TOOLS.iter().find(|tool| tool.name == name)
}

/// Every tool's name, for error messages.
pub fn names() -> Vec<&'static str> {
    TOOLS.iter().map(|tool| tool.name).collect()
}

/// Runs a tool call's JSON arguments through the named tool.
pub fn run(tool: &Tool, arguments: &str) -> Result<Value, String> {
    let arguments: Value = if arguments.trim().is_empty() {
        json!({})
    } else {
        serde_json::from_str(arguments).map_err(|e| format!("arguments are not JSON: {e}"))?
    };
    if !arguments.is_object() {
        return Err("arguments must be a JSON object".to_owned());
    }
    (tool.run)(&arguments)
}

fn echo(arguments: &Value) -> Result<Value, String> {
    match arguments.get("text") {
        Some(Value::String(text)) => Ok(json!({ "text": text })),
        _ => Err("text: a string is required".to_owned()),
    }
}

fn add(arguments: &Value) -> Result<Value, String> {
    let numbers = arguments
        .get("numbers")
        .and_then(Value::as_array)
        .ok_or("numbers: an array is required")?;
    let mut sum = 0.0;
    for (i, number) in numbers.iter().enumerate() {
        sum += number
            .as_f64()
            .ok_or_else(|| format!("numbers[{i}]: a number is required"))?;
    }
    if !sum.is_finite() {
        return Err("numbers: the sum is too large for a 64-bit float".to_owned());
    }
    Ok(json!({ "sum": sum }))
}

fn current_time(_: &Value) -> Result<Value, String> {
    Ok(json!({ "utc": crate::domain::rfc3339(crate::domain::now_ms()) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_returns_its_text() {
        let tool = find("echo").expect("echo exists");
        assert_eq!(run(tool, r#"{"text":"hi"}"#), Ok(json!({"text": "hi"})));
    }

    #[test]
    fn add_sums_numbers() {
        let tool = find("add").expect("add exists");
        assert_eq!(
            run(tool, r#"{"numbers":[1, 2.5]}"#),
            Ok(json!({"sum": 3.5}))
        );
    }

    #[test]
    fn bad_arguments_are_errors_not_panics() {
        let tool = find("add").expect("add exists");
        for arguments in [
            "{",
            "[1]",
            r#"{"numbers":"x"}"#,
            r#"{"numbers":["x"]}"#,
            r#"{"numbers":[1e308,1e308]}"#,
            r#"{"numbers":[-1e308,-1e308]}"#,
        ] {
            assert!(run(tool, arguments).is_err(), "{arguments}");
        }
    }
}
