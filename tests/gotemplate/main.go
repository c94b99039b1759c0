// Renders an Ollama TEMPLATE with Go's text/template, the engine Ollama uses, the way Ollama's chat
// endpoint does: when the Modelfile has a SYSTEM and the conversation does not start with a system
// message, SYSTEM goes in first as one (ollama server/routes.go); consecutive messages of one role
// (tool results aside) are merged with a blank line between them; the template sees .Messages,
// .System (every system message), .Tools, and the `json` function, shaped as Ollama shapes them.
//
// Reads on stdin:
//
//	{"template": "...", "system": "...", "want": "prompt" | "tool_tag",
//	 "tools": [{"type": "function", "function": {"name", "description", "parameters"}}],
//	 "messages": [{"role", "content", "tool_calls": [{"function": {"name", "arguments": {...}}}],
//	               "tool_name", "tool_call_id"}]}
//
// and writes the rendered prompt to stdout, exactly, with no trailing newline added. With "want":
// "tool_tag" it writes instead the text Ollama's tool-call parser looks for in a reply: the first text
// inside the template's `if .ToolCalls`, up to its first "{", trimmed ("{" when there is none).
// Standard library only: the tests build it offline.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

// ---- the request, as Ollama's API decodes it ----

// PropertyType is a JSON schema "type": one name, or several.
type PropertyType []string

func (t *PropertyType) UnmarshalJSON(data []byte) error {
	var one string
	if err := json.Unmarshal(data, &one); err == nil {
		*t = PropertyType{one}
		return nil
	}
	var several []string
	if err := json.Unmarshal(data, &several); err != nil {
		return err
	}
	*t = several
	return nil
}

func (t PropertyType) MarshalJSON() ([]byte, error) {
	if len(t) == 1 {
		return json.Marshal(t[0])
	}
	return json.Marshal([]string(t))
}

// Properties keeps a schema's properties in the order the request gave them.
type Properties struct {
	names  []string
	values map[string]ToolProperty
}

func (p *Properties) UnmarshalJSON(data []byte) error {
	p.names, p.values = nil, map[string]ToolProperty{}
	dec := json.NewDecoder(bytes.NewReader(data))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return fmt.Errorf("properties must be an object")
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		name := tok.(string)
		var value ToolProperty
		if err := dec.Decode(&value); err != nil {
			return err
		}
		if _, seen := p.values[name]; !seen {
			p.names = append(p.names, name)
		}
		p.values[name] = value
	}
	_, err := dec.Token()
	return err
}

func (p Properties) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, name := range p.names {
		if i > 0 {
			b.WriteByte(',')
		}
		key, _ := json.Marshal(name)
		value, err := json.Marshal(p.values[name])
		if err != nil {
			return nil, err
		}
		b.Write(key)
		b.WriteByte(':')
		b.Write(value)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

func (p *Properties) asMap() map[string]ToolProperty {
	if p == nil {
		return nil
	}
	out := make(map[string]ToolProperty, len(p.names))
	for name, value := range p.values {
		out[name] = value
	}
	return out
}

type ToolProperty struct {
	AnyOf       []ToolProperty `json:"anyOf,omitempty"`
	Type        PropertyType   `json:"type,omitempty"`
	Items       any            `json:"items,omitempty"`
	Description string         `json:"description,omitempty"`
	Enum        []any          `json:"enum,omitempty"`
	Properties  *Properties    `json:"properties,omitempty"`
	Required    []string       `json:"required,omitempty"`
}

type Tool struct {
	Type     string `json:"type"`
	Items    any    `json:"items"`
	Function struct {
		Name        string `json:"name"`
		Description string `json:"description"`
		Parameters  struct {
			Type       string      `json:"type"`
			Defs       any         `json:"$defs"`
			Items      any         `json:"items"`
			Required   []string    `json:"required"`
			Properties *Properties `json:"properties"`
		} `json:"parameters"`
	} `json:"function"`
}

type ToolCall struct {
	ID       string `json:"id"`
	Function struct {
		Index     int             `json:"index"`
		Name      string          `json:"name"`
		Arguments json.RawMessage `json:"arguments"` // an object, or (OpenAI's wire form) a JSON string of one
	} `json:"function"`
}

type Message struct {
	Role       string     `json:"role"`
	Content    string     `json:"content"`
	ToolCalls  []ToolCall `json:"tool_calls"`
	ToolName   string     `json:"tool_name"`
	ToolCallID string     `json:"tool_call_id"`
}

type Input struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Want     string    `json:"want"`
	Tools    []Tool    `json:"tools"`
	Messages []Message `json:"messages"`
}

// ---- what a template sees ----

type templateProperties map[string]ToolProperty

func (p templateProperties) String() string { return marshal(p, "{}") }

type templateArgs map[string]any // a plain Go map: json.Marshal sorts its keys

func (a templateArgs) String() string { return marshal(a, "{}") }

type templateTool struct {
	Type     string           `json:"type"`
	Items    any              `json:"items,omitempty"`
	Function templateFunction `json:"function"`
}

func (t templateTool) String() string { return marshal(t, "") }

type templateTools []templateTool

func (t templateTools) String() string { return marshal(t, "") }

type templateFunction struct {
	Name        string             `json:"name"`
	Description string             `json:"description"`
	Parameters  templateParameters `json:"parameters"`
}

type templateParameters struct {
	Type       string             `json:"type"`
	Defs       any                `json:"$defs,omitempty"`
	Items      any                `json:"items,omitempty"`
	Required   []string           `json:"required,omitempty"`
	Properties templateProperties `json:"properties"`
}

type templateCall struct {
	ID       string
	Function struct {
		Index     int
		Name      string
		Arguments templateArgs
	}
}

type templateMessage struct {
	Role       string
	Content    string
	Thinking   string
	ToolCalls  []templateCall
	ToolName   string
	ToolCallID string
}

func marshal(v any, ifNil string) string {
	if ifNil != "" {
		if m, ok := v.(templateArgs); ok && m == nil {
			return ifNil
		}
		if m, ok := v.(templateProperties); ok && m == nil {
			return ifNil
		}
	}
	b, _ := json.Marshal(v)
	return string(b)
}

func arguments(raw json.RawMessage) (templateArgs, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	if raw[0] == '"' {
		var text string
		if err := json.Unmarshal(raw, &text); err != nil {
			return nil, err
		}
		raw = []byte(text)
	}
	var args map[string]any
	err := json.Unmarshal(raw, &args)
	return args, err
}

func templateToolsOf(tools []Tool) templateTools {
	if tools == nil {
		return nil
	}
	out := make(templateTools, len(tools))
	for i, t := range tools {
		p := t.Function.Parameters
		out[i] = templateTool{Type: t.Type, Items: t.Items, Function: templateFunction{
			Name: t.Function.Name, Description: t.Function.Description,
			Parameters: templateParameters{Type: p.Type, Defs: p.Defs, Items: p.Items, Required: p.Required,
				Properties: p.Properties.asMap()},
		}}
	}
	return out
}

// collated merges consecutive messages of one role (tool results aside) and gathers the system text.
func collated(msgs []Message) (string, []*templateMessage, error) {
	var system []string
	var out []*templateMessage
	for _, m := range msgs {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(out); n > 0 && out[n-1].Role == m.Role && m.Role != "tool" {
			out[n-1].Content += "\n\n" + m.Content
			continue
		}
		tm := &templateMessage{Role: m.Role, Content: m.Content, ToolName: m.ToolName, ToolCallID: m.ToolCallID}
		for i, c := range m.ToolCalls {
			args, err := arguments(c.Function.Arguments)
			if err != nil {
				return "", nil, fmt.Errorf("message tool call %d: arguments: %w", i, err)
			}
			var call templateCall
			call.ID = c.ID
			call.Function.Index, call.Function.Name, call.Function.Arguments = c.Function.Index, c.Function.Name, args
			tm.ToolCalls = append(tm.ToolCalls, call)
		}
		out = append(out, tm)
	}
	return strings.Join(system, "\n\n"), out, nil
}

func fail(code int, what string, err error) {
	fmt.Fprintln(os.Stderr, what, err)
	os.Exit(code)
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fail(2, "bad input:", err)
	}
	msgs := in.Messages
	for i := range msgs {
		msgs[i].Role = strings.ToLower(msgs[i].Role)
	}
	if in.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]Message{{Role: "system", Content: in.System}}, msgs...)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl, err := template.New("ollama").Option("missingkey=zero").Funcs(funcs).Parse(in.Template)
	if err != nil {
		fail(3, "template does not parse:", err)
	}
	if in.Want == "tool_tag" {
		fmt.Print(toolTag(tmpl))
		return
	}
	system, messages, err := collated(msgs)
	if err != nil {
		fail(2, "bad input:", err)
	}
	data := map[string]any{"System": system, "Messages": messages, "Tools": templateToolsOf(in.Tools),
		"Response": "", "Think": false, "ThinkLevel": "", "IsThinkSet": false}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		fail(4, "template does not execute:", err)
	}
}
