// Renders an Ollama TEMPLATE with Go's text/template, the engine Ollama uses.
// Reads {"template": "...", "messages": [{"role": "...", "content": "..."}]} on stdin and
// writes the rendered prompt to stdout, exactly, with no trailing newline added.
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
	Messages []Message `json:"messages"`
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "bad input:", err)
		os.Exit(2)
	}
	tmpl, err := template.New("ollama").Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "template does not parse:", err)
		os.Exit(3)
	}
	data := map[string]any{"Messages": in.Messages}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		fmt.Fprintln(os.Stderr, "template does not execute:", err)
		os.Exit(4)
	}
}
