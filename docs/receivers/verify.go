// Verify an Outrider (Scout-compatible) callback signature in Go.
//
// Copy Verify (and the error type above it) into your receiver; call it with
// the raw request body bytes, before parsing them. Run this file to check it
// against the shared vectors:
//
//	go run docs/receivers/verify.go crates/outrider-signature/vectors.json
package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// SignatureError says why a header did not verify; compare with == or errors.Is.
type SignatureError string

func (e SignatureError) Error() string { return string(e) }

const (
	ErrMalformed SignatureError = "malformed" // not t=<seconds>,sig=<base64>[,sig=...]
	ErrExpired   SignatureError = "expired"   // t is more than Tolerance seconds from now
	ErrMismatch  SignatureError = "mismatch"  // no sig matches the body under this secret
)

// Tolerance is how far t may be from the receiver's clock, in seconds, either way.
const Tolerance = 300

// Verify returns nil if header signs body under secret at now (unix seconds,
// usually time.Now().Unix()), else ErrMalformed, ErrExpired or ErrMismatch.
func Verify(secret string, header string, body []byte, now int64) error {
	t, seen, sigs := "", false, [][]byte{}
	for _, part := range strings.Split(header, ",") {
		key, value, _ := strings.Cut(strings.TrimSpace(part), "=")
		switch key {
		case "t":
			if seen {
				return ErrMalformed
			}
			t, seen = value, true
		case "sig":
			sig, err := base64.StdEncoding.DecodeString(value)
			if err != nil {
				return ErrMalformed
			}
			sigs = append(sigs, sig)
		}
	}
	// Whole seconds only: a 13-digit millisecond value is malformed.
	// ParseUint refuses an empty value, a sign and anything but ASCII digits.
	seconds, err := strconv.ParseUint(t, 10, 64)
	if err != nil || len(t) > 10 || len(sigs) == 0 {
		return ErrMalformed
	}
	if ts := int64(seconds); now-ts > Tolerance || ts-now > Tolerance {
		return ErrExpired
	}
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(t + "."))
	mac.Write(body)
	expected := mac.Sum(nil)
	for _, sig := range sigs {
		if hmac.Equal(expected, sig) { // constant time
			return nil
		}
	}
	return ErrMismatch
}

func main() {
	if len(os.Args) < 2 {
		fmt.Println("usage: go run verify.go <vectors.json>")
		os.Exit(2)
	}
	var file struct {
		Vectors []struct {
			Name, Secret, Header, Error string
			BodyBase64                  string `json:"body_base64"`
			Now                         int64
			Valid                       bool
		}
	}
	text, err := os.ReadFile(os.Args[1])
	if err == nil {
		err = json.Unmarshal(text, &file)
	}
	if err != nil {
		fmt.Println(err)
		os.Exit(2)
	}
	failed := 0
	for _, v := range file.Vectors {
		body, _ := base64.StdEncoding.DecodeString(v.BodyBase64)
		got, want := "", ""
		if err := Verify(v.Secret, v.Header, body, v.Now); err != nil {
			got = err.Error()
		}
		if !v.Valid {
			want = v.Error
		}
		if got != want {
			failed++
			fmt.Printf("FAIL %s: got %q, want %q\n", v.Name, got, want)
		}
	}
	fmt.Printf("%d passed, %d failed\n", len(file.Vectors)-failed, failed)
	if failed > 0 {
		os.Exit(1)
	}
}
