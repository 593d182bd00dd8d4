// Renders an Ollama Modelfile TEMPLATE (Go text/template) as Ollama does, on its data: .Messages,
// read as JSON from stdin ([{"role": ..., "content": ...}, ...]). tests/test_release.py runs it.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	text, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	var data struct{ Messages []Message }
	if err := json.NewDecoder(os.Stdin).Decode(&data.Messages); err != nil {
		panic(err)
	}
	if err := template.Must(template.New("TEMPLATE").Parse(string(text))).Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
