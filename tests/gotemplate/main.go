// Renders an Ollama TEMPLATE with Go's text/template, the engine Ollama uses, the way Ollama's chat
// endpoint does: when the Modelfile has a SYSTEM and the conversation does not start with a system
// message, SYSTEM goes in first as one (ollama server/routes.go).
// Reads {"template": "...", "system": "...", "messages": [{"role": "...", "content": "..."}]} on stdin
// and writes the rendered prompt to stdout, exactly, with no trailing newline added.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "bad input:", err)
		os.Exit(2)
	}
	msgs := in.Messages
	if in.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]Message{{Role: "system", Content: in.System}}, msgs...)
	}
	tmpl, err := template.New("ollama").Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "template does not parse:", err)
		os.Exit(3)
	}
	data := map[string]any{"Messages": msgs}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		fmt.Fprintln(os.Stderr, "template does not execute:", err)
		os.Exit(4)
	}
}
