package modules

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
)

// strictDecode decodes one JSON value into v as Caddy decodes module
// configs (an unknown field is an error), and names the field a bad value
// sits in: a value that fails in its own decoder (a duration such as
// "5 s") otherwise reaches the operator as "time: unknown unit" with no
// field at all. The error reads "upstreams[0].tls.ca: ..." then.
func strictDecode(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil {
		return nil
	}
	var syntax *json.SyntaxError
	if errors.As(err, &syntax) {
		return err // it says where already
	}
	return namedError(data, reflect.TypeOf(v), err)
}

// namedError returns err with the path of the first field of data (a JSON
// value of type t) whose value fails to decode, and that value's own
// error; err itself when no field can be blamed.
func namedError(data []byte, t reflect.Type, err error) error {
	path, leaf := blame(data, t)
	if path == "" || leaf == nil {
		return inWords(err)
	}
	return fmt.Errorf("%s: %w", path, inWords(leaf))
}

// inWords says a value of the wrong JSON type in the operator's words:
// Go's ("cannot unmarshal string into Go value of type
// []*modules.Upstream") are not. Other errors pass as they are.
func inWords(err error) error {
	if wrongType, ok := err.(*json.UnmarshalTypeError); ok && wrongType.Type != nil {
		return inWordsFor(wrongType.Type, err)
	}
	return err
}

// inWordsFor is inWords for a value decoded into a field of type t, which
// names what it takes better than the type the decoder failed on (a
// caddy.Duration fails as an int64).
func inWordsFor(t reflect.Type, err error) error {
	wrongType, ok := err.(*json.UnmarshalTypeError)
	if !ok {
		return err
	}
	if strings.HasPrefix(wrongType.Value, "number") {
		return fmt.Errorf("want %s that fits, got %s", jsonKind(t), wrongType.Value)
	}
	return fmt.Errorf("want %s, got a JSON %s", jsonKind(t), wrongType.Value)
}

// jsonKind names the JSON value a Go type decodes from.
func jsonKind(t reflect.Type) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == reflect.TypeFor[caddy.Duration]() {
		return `a duration such as "5s"`
	}
	switch t.Kind() {
	case reflect.Slice, reflect.Array:
		return "a list"
	case reflect.Struct, reflect.Map:
		return "an object"
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "true or false"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "a whole number"
	}
	return "a " + t.String()
}

var unmarshalerType = reflect.TypeFor[json.Unmarshaler]()

// blame walks data along t to the innermost value that fails to decode,
// and returns its path ("a.b[2].c") and its error; an object whose fields
// all decode alone is blamed itself (an unknown field). Types with their
// own decoder are leaves.
func blame(data []byte, t reflect.Type) (string, error) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	leaf := func() (string, error) { return "", inWordsFor(t, decodeAs(data, t)) }
	if reflect.PointerTo(t).Implements(unmarshalerType) || bytes.Equal(bytes.TrimSpace(data), []byte("null")) {
		return leaf()
	}
	switch t.Kind() {
	case reflect.Struct:
		var fields map[string]json.RawMessage
		if json.Unmarshal(data, &fields) != nil {
			return leaf()
		}
		for i := range t.NumField() {
			f := t.Field(i)
			name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			if !f.IsExported() || name == "-" {
				continue
			}
			if name == "" {
				name = f.Name
			}
			raw, ok := fields[name]
			if !ok || decodeAs(raw, f.Type) == nil {
				continue
			}
			sub, err := blame(raw, f.Type)
			return joinPath(name, sub), err
		}
		return leaf() // every field decodes alone: one is unknown
	case reflect.Slice, reflect.Array:
		var items []json.RawMessage
		if json.Unmarshal(data, &items) != nil {
			return leaf()
		}
		for i, raw := range items {
			if decodeAs(raw, t.Elem()) != nil {
				sub, err := blame(raw, t.Elem())
				return joinPath("["+strconv.Itoa(i)+"]", sub), err
			}
		}
		return leaf()
	case reflect.Map:
		var items map[string]json.RawMessage
		if json.Unmarshal(data, &items) != nil {
			return leaf()
		}
		for _, k := range slices.Sorted(maps.Keys(items)) {
			if decodeAs(items[k], t.Elem()) != nil {
				sub, err := blame(items[k], t.Elem())
				return joinPath(k, sub), err
			}
		}
		return leaf()
	}
	return leaf()
}

// decodeAs decodes data into a new value of type t, strictly.
func decodeAs(data []byte, t reflect.Type) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	return dec.Decode(reflect.New(t).Interface())
}

// joinPath puts a field's or an index's path before what lies inside it.
func joinPath(outer, inner string) string {
	switch {
	case inner == "":
		return outer
	case inner[0] == '[':
		return outer + inner
	}
	return outer + "." + inner
}
