// The tool-call tag: the text Ollama's tool-call parser looks for in a reply, which it takes from the
// TEMPLATE itself (ollama tools/template.go): the first text that is not blank inside the first
// `if .ToolCalls`, up to its first "{", trimmed; "{" when there is none.
package main

import (
	"bytes"
	"strings"
	"text/template"
	"text/template/parse"
)

func mentionsToolCalls(pipe *parse.PipeNode) bool {
	for _, cmd := range pipe.Cmds {
		for _, arg := range cmd.Args {
			if f, ok := arg.(*parse.FieldNode); ok {
				for _, ident := range f.Ident {
					if ident == "ToolCalls" {
						return true
					}
				}
			}
		}
	}
	return false
}

func branches(n parse.Node) []*parse.ListNode {
	var b *parse.BranchNode
	switch n := n.(type) {
	case *parse.ListNode:
		return []*parse.ListNode{n}
	case *parse.IfNode:
		b = &n.BranchNode
	case *parse.RangeNode:
		b = &n.BranchNode
	case *parse.WithNode:
		b = &n.BranchNode
	default:
		return nil
	}
	if b.ElseList != nil {
		return []*parse.ListNode{b.List, b.ElseList}
	}
	return []*parse.ListNode{b.List}
}

func toolCallsIf(nodes []parse.Node) *parse.IfNode {
	for _, n := range nodes {
		if i, ok := n.(*parse.IfNode); ok && mentionsToolCalls(i.Pipe) {
			return i
		}
		for _, list := range branches(n) {
			if found := toolCallsIf(list.Nodes); found != nil {
				return found
			}
		}
	}
	return nil
}

// firstText: the first text that is not blank, looking into the first nested block but no further.
func firstText(nodes []parse.Node) *parse.TextNode {
	for _, n := range nodes {
		switch n := n.(type) {
		case *parse.TextNode:
			if len(bytes.TrimSpace(n.Text)) > 0 {
				return n
			}
		case *parse.ListNode:
			if t := firstText(n.Nodes); t != nil {
				return t
			}
		case *parse.IfNode, *parse.RangeNode, *parse.WithNode:
			for _, list := range branches(n) {
				if t := firstText(list.Nodes); t != nil {
					return t
				}
			}
			return nil
		}
	}
	return nil
}

func toolTag(tmpl *template.Template) string {
	node := toolCallsIf(tmpl.Tree.Root.Nodes)
	if node == nil {
		return "{"
	}
	text := firstText(node.List.Nodes)
	if text == nil {
		return "{"
	}
	tag := strings.ReplaceAll(string(text.Text), "\r\n", "\n")
	tag, _, _ = strings.Cut(tag, "{")
	if tag = strings.TrimSpace(tag); tag == "" {
		return "{"
	}
	return tag
}
