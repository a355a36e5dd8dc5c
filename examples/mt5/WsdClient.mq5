//+------------------------------------------------------------------+
//| WsdClient.mq5: a minimal wsd client for MetaTrader 5 (Expert     |
//| Advisor). WebSocket over the terminal's socket functions: the    |
//| handshake, masked text frames, pongs, an app-level ping, acks,   |
//| batch frames, and session resume with positions after a drop.    |
//| A sketch to start from: see README.md next to it (it was not     |
//| compiled where it was written; tests/test_mt5_example.py plays   |
//| the same bytes against a real wsd).                              |
//+------------------------------------------------------------------+
#property description "wsd client sketch: subscribes to trading signals over WebSocket"
#property version     "1.00"

input string InpHost       = "wsd.example.com"; // wsd host (add it in Tools > Options > Expert Advisors)
input uint   InpPort       = 8443;              // wsd port
input bool   InpTls        = true;              // wss:// (TLS); false = ws://
input string InpToken      = "";                // JWT for the mt5 pool (sub, company_id, exp)
input string InpChannel    = "trading-signals"; // channel group to subscribe to
input int    InpAppPingSec = 15;                // app-level ping interval, seconds

#define WS_CONNECTING 1   // request sent, waiting for the 101
#define WS_OPEN       2   // frames flow
#define OP_CONT  0x0
#define OP_TEXT  0x1
#define OP_BIN   0x2
#define OP_CLOSE 0x8
#define OP_PING  0x9
#define OP_PONG  0xA

int    g_sock      = INVALID_HANDLE;
int    g_state     = 0;
uchar  g_rx[];                 // bytes received and not yet parsed
uchar  g_frag[];               // a fragmented text message being put together
string g_key       = "";       // this handshake's Sec-WebSocket-Key
string g_session   = "";       // session_id from the welcome: resume with it
string g_channel   = "";       // the instance subscribed to, e.g. trading-signals/acme
long   g_lastOff   = 0;        // last message processed in g_channel: offset and epoch
string g_lastEpoch = "";
int    g_nextId    = 1;
int    g_subId     = 0;        // id of the subscribe request awaiting its reply
int    g_pingId    = 0;        // id of the app ping awaiting its reply (0 = none)
ulong  g_pingSent  = 0;
ulong  g_lastPing  = 0;
ulong  g_opened    = 0;
ulong  g_retryAt   = 0;
int    g_backoff   = 500;      // ms, doubles to 30 s, reset by a welcome
bool   g_stop      = false;    // ended for good: do not reconnect

//+------------------------------------------------------------------+
int OnInit()
  {
   if(InpToken == "")
     {
      Print("wsd: set InpToken (a JWT for the mt5 pool)");
      return(INIT_PARAMETERS_INCORRECT);
     }
   EventSetMillisecondTimer(100);
   return(INIT_SUCCEEDED);
  }

void OnDeinit(const int reason)
  {
   EventKillTimer();
   // 1001 "going away" keeps the session on the server for session_ttl_s (1000 would end it).
   if(g_state == WS_OPEN)
      SendClose(1001);
   Drop();
  }

void OnTimer()
  {
   if(g_stop)
      return;
   if(g_sock == INVALID_HANDLE)
     {
      if(GetTickCount64() >= g_retryAt)
         Connect();
      return;
     }
   if(!Pump())
     {
      Lost(1006, "connection lost");
      return;
     }
   ulong now = GetTickCount64();
   if(g_state == WS_CONNECTING && now - g_opened > 10000)
     {
      Lost(1006, "no handshake response in 10 s");
      return;
     }
   if(g_state != WS_OPEN)
      return;
   if(g_pingId != 0 && now - g_pingSent > 10000)
     {
      Lost(1006, "no reply to the app ping in 10 s");  // the server or the path to it is dead
      return;
     }
   if(g_pingId == 0 && now - g_lastPing >= (ulong)InpAppPingSec * 1000)
     {
      g_pingId = g_nextId++;
      g_pingSent = now;
      g_lastPing = now;
      SendText(StringFormat("{\"op\":\"ping\",\"id\":%d}", g_pingId));
     }
  }

//+------------------------------------------------------------------+
//| Your logic goes here: one channel message (data is raw JSON).    |
//+------------------------------------------------------------------+
void OnSignal(const string channel, const string msg_type, const string data)
  {
   PrintFormat("wsd: %s %s %s", channel, msg_type, data);
  }

// Publishing is allowed from the mt5 pool into trading-signals (its group's publishers).
void PublishSignal(const string symbol, const string side, const double price)
  {
   SendText(StringFormat("{\"op\":\"publish\",\"id\":%d,\"channel\":\"%s\",\"type\":\"trading_signal\","
                         "\"data\":{\"symbol\":\"%s\",\"side\":\"%s\",\"price\":%.5f}}",
                         g_nextId++, InpChannel, symbol, side, price));
  }

//+------------------------------------------------------------------+
//| Connecting: TCP, TLS, then the upgrade request.                  |
//+------------------------------------------------------------------+
void Connect()
  {
   g_sock = SocketCreate();
   if(g_sock == INVALID_HANDLE)
     {
      Lost(1006, StringFormat("SocketCreate failed (%d)", GetLastError()));
      return;
     }
   if(!SocketConnect(g_sock, InpHost, InpPort, 5000))
     {
      Lost(1006, StringFormat("cannot connect to %s:%d (%d): is the host allowed in the options?",
                              InpHost, InpPort, GetLastError()));
      return;
     }
   if(InpTls && !SocketTlsHandshake(g_sock, InpHost))
     {
      Lost(1006, StringFormat("TLS handshake with %s failed (%d)", InpHost, GetLastError()));
      return;
     }
   // The request target in absolute form, the token in the URL: MQL5 cannot easily set subprotocols,
   // and wsd reads the token from ?token=. No Origin, no Sec-WebSocket-Extensions: nothing is negotiated.
   string target = StringFormat("%s://%s:%d/ws/mt5?token=%s", InpTls ? "wss" : "ws", InpHost, InpPort, InpToken);
   if(g_session != "")
     {
      target += "&session=" + g_session;
      if(g_channel != "" && g_lastEpoch != "")
         target += "&since=" + Base64Url(StringFormat("{\"%s\":[%I64d,\"%s\"]}", g_channel, g_lastOff, g_lastEpoch));
     }
   g_key = RandomKey();
   string req = "GET " + target + " HTTP/1.1\r\n"
                "Host: " + InpHost + ":" + IntegerToString(InpPort) + "\r\n"
                "Upgrade: websocket\r\n"
                "Connection: Upgrade\r\n"
                "Sec-WebSocket-Key: " + g_key + "\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n";
   uchar bytes[];
   int n = StringToCharArray(req, bytes, 0, WHOLE_ARRAY, CP_UTF8) - 1;  // without the trailing 0
   ArrayFree(g_rx);
   g_state = WS_CONNECTING;
   g_opened = GetTickCount64();
   if(!SendRaw(bytes, n))
      Lost(1006, "cannot send the handshake");
  }

// The response head: 101 with the right Sec-WebSocket-Accept, or a refusal with a JSON body.
// Returns false while the head (or a refusal's body) is still incomplete.
bool ParseHandshake()
  {
   int end = FindHeadEnd();
   if(end < 0)
      return(false);
   string head = CharArrayToString(g_rx, 0, end, CP_UTF8);
   string lower = head;
   StringToLower(lower);
   int status = (int)StringToInteger(StringSubstr(head, 9, 3));  // "HTTP/1.1 101 ..."
   if(status != 101)
     {
      int length = (int)StringToInteger(HeaderValue(lower, "content-length"));
      if(ArraySize(g_rx) < end + 4 + length)
         return(false);                                             // the body is still coming
      string body = CharArrayToString(g_rx, end + 4, length, CP_UTF8);
      // {"error":"invalid_token","message":"..."}: 401/403/404 will not pass by retrying as is
      PrintFormat("wsd: handshake refused: %d %s", status, body);
      if(status == 401 || status == 403 || status == 404)
         g_stop = true;
      Lost(1006, "refused");
      return(false);
     }
   if(HeaderValue(lower, "sec-websocket-accept") != StringToLowerCopy(AcceptFor(g_key)))
     {
      Lost(1006, "bad Sec-WebSocket-Accept");
      return(false);
     }
   ArrayRemove(g_rx, 0, end + 4);   // frames (the welcome) may follow in the same read
   g_state = WS_OPEN;
   g_lastPing = GetTickCount64();
   return(true);
  }

//+------------------------------------------------------------------+
//| Reading: whatever arrived, then every complete frame.            |
//+------------------------------------------------------------------+
bool Pump()
  {
   uchar chunk[];
   int got = 0;
   if(InpTls)
      got = SocketTlsReadAvailable(g_sock, chunk, 65536);
   else
     {
      uint avail = SocketIsReadable(g_sock);
      if(avail > 0)
         got = SocketRead(g_sock, chunk, avail, 100);
     }
   if(got > 0)
     {
      int old = ArraySize(g_rx);
      ArrayResize(g_rx, old + got);
      ArrayCopy(g_rx, chunk, old, 0, got);
     }
   // Parse what arrived before looking at the connection: a refusal's body or a close frame often comes
   // together with the end of the connection.
   if(g_state == WS_CONNECTING)
      ParseHandshake();
   while(g_state == WS_OPEN && ParseFrame())
     {
     }
   if(g_sock == INVALID_HANDLE)
      return(true);                                // already handled (Lost)
   return(got >= 0 && SocketIsConnected(g_sock));
  }

// One frame from g_rx; false when none is complete yet.
bool ParseFrame()
  {
   int have = ArraySize(g_rx);
   if(have < 2)
      return(false);
   int b0 = g_rx[0], b1 = g_rx[1];
   bool fin = (b0 & 0x80) != 0;
   int op = b0 & 0x0F;
   ulong len = b1 & 0x7F;
   int pos = 2;
   if((b0 & 0x70) != 0 || (b1 & 0x80) != 0)
     {
      // RSV bits mean an extension (none was negotiated); server frames are never masked.
      SendClose(1002);
      Lost(1002, "protocol error from the server");
      return(false);
     }
   if(len == 126)
     {
      if(have < 4)
         return(false);
      len = ((ulong)g_rx[2] << 8) | g_rx[3];
      pos = 4;
     }
   else if(len == 127)
     {
      if(have < 10)
         return(false);
      len = 0;
      for(int i = 2; i < 10; i++)
         len = (len << 8) | g_rx[i];
      pos = 10;
     }
   if((ulong)have < pos + len)
      return(false);
   uchar payload[];
   ArrayResize(payload, (int)len);
   if(len > 0)
      ArrayCopy(payload, g_rx, 0, pos, (int)len);
   ArrayRemove(g_rx, 0, pos + (int)len);

   switch(op)
     {
      case OP_TEXT:
      case OP_CONT:
        {
         int old = ArraySize(g_frag);
         ArrayResize(g_frag, old + (int)len);
         if(len > 0)
            ArrayCopy(g_frag, payload, old, 0, (int)len);
         if(fin)
           {
            string text = CharArrayToString(g_frag, 0, ArraySize(g_frag), CP_UTF8);
            ArrayFree(g_frag);
            OnText(text);
           }
         break;
        }
      case OP_PING:
         SendFrame(OP_PONG, payload, (int)len);   // the server's heartbeat: 3 unanswered pings close us
         break;
      case OP_PONG:
         break;
      case OP_CLOSE:
        {
         int code = len >= 2 ? ((payload[0] << 8) | payload[1]) : 1005;
         SendClose(code);                          // echo, then close the TCP connection
         Lost(code, len > 2 ? CharArrayToString(payload, 2, (int)len - 2, CP_UTF8) : "");
         return(false);
        }
      default:                                     // binary: wsd sends JSON text only
         SendClose(1003);
         Lost(1003, "unexpected binary frame");
         return(false);
     }
   return(true);
  }

//+------------------------------------------------------------------+
//| The protocol: welcome, replies, messages, batches.               |
//+------------------------------------------------------------------+
void OnText(const string f)
  {
   string type = JsonString(f, "type");
   if(type == "welcome")
     {
      bool resumed = JsonRaw(f, "resumed") == "true";
      g_session = JsonString(f, "session_id");
      g_backoff = 500;
      PrintFormat("wsd: in (session %s, resumed %s)", g_session, resumed ? "yes" : "no");
      if(!resumed)                                 // a resumed session has its subscriptions back
        {
         g_subId = g_nextId++;
         SendText(StringFormat("{\"op\":\"subscribe\",\"id\":%d,\"channel\":\"%s\"}", g_subId, InpChannel));
        }
     }
   else if(type == "message")
      OnMessage(f);
   else if(type == "batch")
     {
      string items[];
      int n = JsonArrayItems(JsonRaw(f, "messages"), items);
      for(int i = 0; i < n; i++)
         OnMessage(items[i]);
     }
   else if(type == "recovery")
      PrintFormat("wsd: messages of %s were lost for good: reload state from its source", JsonString(f, "channel"));
   else if(type == "")                             // a reply: {"id":..,"ok":..}
     {
      int id = (int)StringToInteger(JsonRaw(f, "id"));
      if(JsonRaw(f, "ok") != "true")
         PrintFormat("wsd: request %d failed: %s", id, JsonRaw(f, "error"));
      else if(id == g_subId)
         g_channel = JsonString(JsonRaw(f, "result"), "channel");
      if(id == g_pingId)
         g_pingId = 0;
     }
  }

void OnMessage(const string m)
  {
   string seq = JsonRaw(m, "seq");
   if(seq != "")                                   // reliable: acknowledge, or it is sent again
      SendText("{\"op\":\"ack\",\"seq\":" + seq + "}");
   string channel = JsonString(m, "channel");
   long offset = StringToInteger(JsonRaw(m, "offset"));
   string epoch = JsonString(m, "epoch");
   if(channel == g_channel && channel != "")
     {
      if(epoch == g_lastEpoch && offset <= g_lastOff)
         return;                                   // seen before (a resume may repeat): dropped
      g_lastOff = offset;
      g_lastEpoch = epoch;
     }
   OnSignal(channel, JsonString(m, "msg_type"), JsonRaw(m, "data"));
  }

// The connection is gone: decide whether (and when) to come back.
void Lost(const int code, const string why)
  {
   PrintFormat("wsd: closed %d %s", code, why);
   Drop();
   if(code == 1000 || code == 4000 || code == 4003 || code == 4011)
     {
      g_stop = true;                               // ended on purpose, token no longer admitted, taken over
      return;
     }
   if(code == 4001)
      Print("wsd: token expired: give the EA a fresh token; the session still resumes");
   g_retryAt = GetTickCount64() + g_backoff + MathRand() % g_backoff;
   g_backoff = MathMin(g_backoff * 2, 30000);
  }

void Drop()
  {
   if(g_sock != INVALID_HANDLE)
      SocketClose(g_sock);
   g_sock = INVALID_HANDLE;
   g_state = 0;
   g_pingId = 0;
   ArrayFree(g_rx);
   ArrayFree(g_frag);
  }

//+------------------------------------------------------------------+
//| Writing: client frames are masked.                               |
//+------------------------------------------------------------------+
bool SendText(const string s)
  {
   uchar p[];
   int n = StringToCharArray(s, p, 0, WHOLE_ARRAY, CP_UTF8) - 1;
   return(SendFrame(OP_TEXT, p, n));
  }

bool SendClose(const int code)
  {
   uchar p[2];
   p[0] = (uchar)((code >> 8) & 0xFF);
   p[1] = (uchar)(code & 0xFF);
   return(SendFrame(OP_CLOSE, p, 2));
  }

bool SendFrame(const int op, const uchar &payload[], const int len)
  {
   if(g_sock == INVALID_HANDLE)
      return(false);
   int head = 2 + (len < 126 ? 0 : (len < 65536 ? 2 : 8)) + 4;
   uchar f[];
   ArrayResize(f, head + len);
   f[0] = (uchar)(0x80 | op);                      // FIN, opcode
   int p = 1;
   if(len < 126)
      f[p++] = (uchar)(0x80 | len);                // MASK bit, length
   else if(len < 65536)
     {
      f[p++] = (uchar)(0x80 | 126);
      f[p++] = (uchar)((len >> 8) & 0xFF);
      f[p++] = (uchar)(len & 0xFF);
     }
   else
     {
      f[p++] = (uchar)(0x80 | 127);
      for(int i = 7; i >= 0; i--)
         f[p++] = (uchar)(((ulong)len >> (8 * i)) & 0xFF);
     }
   uchar mask[4];
   for(int i = 0; i < 4; i++)
     {
      mask[i] = (uchar)(MathRand() & 0xFF);
      f[p++] = mask[i];
     }
   for(int i = 0; i < len; i++)
      f[p + i] = (uchar)(payload[i] ^ mask[i % 4]);
   return(SendRaw(f, head + len));
  }

bool SendRaw(const uchar &data[], const int len)
  {
   int sent = InpTls ? SocketTlsSend(g_sock, data, len) : SocketSend(g_sock, data, len);
   return(sent == len);
  }

//+------------------------------------------------------------------+
//| Helpers: the handshake key, base64, the smallest JSON reader.    |
//+------------------------------------------------------------------+
string RandomKey()
  {
   uchar raw[16];
   for(int i = 0; i < 16; i++)
      raw[i] = (uchar)(MathRand() & 0xFF);
   return(Base64(raw));
  }

string AcceptFor(const string key)
  {
   uchar src[], hash[], none[];
   StringToCharArray(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11", src, 0, StringLen(key) + 36, CP_UTF8);
   CryptEncode(CRYPT_HASH_SHA1, src, none, hash);
   return(Base64(hash));
  }

string Base64(const uchar &data[])
  {
   uchar out[], none[];
   CryptEncode(CRYPT_BASE64, data, none, out);
   return(CharArrayToString(out, 0, ArraySize(out), CP_UTF8));
  }

// base64url without padding, for `since`
string Base64Url(const string text)
  {
   uchar src[];
   StringToCharArray(text, src, 0, StringLen(text), CP_UTF8);
   string b = Base64(src);
   StringReplace(b, "+", "-");
   StringReplace(b, "/", "_");
   StringReplace(b, "=", "");
   return(b);
  }

string StringToLowerCopy(string s)
  {
   StringToLower(s);
   return(s);
  }

int FindHeadEnd()
  {
   for(int i = 0; i + 3 < ArraySize(g_rx); i++)
      if(g_rx[i] == '\r' && g_rx[i + 1] == '\n' && g_rx[i + 2] == '\r' && g_rx[i + 3] == '\n')
         return(i);
   return(-1);
  }

// The value of a header in a lower-cased response head ("" when absent).
string HeaderValue(const string lower_head, const string name)
  {
   int at = StringFind(lower_head, "\r\n" + name + ":");
   if(at < 0)
      return("");
   int start = at + StringLen(name) + 3;
   int end = StringFind(lower_head, "\r\n", start);
   string v = StringSubstr(lower_head, start, end < 0 ? -1 : end - start);
   StringTrimLeft(v);
   StringTrimRight(v);
   return(v);
  }

int JsonStringEnd(const string s, const int start)   // index of the closing quote
  {
   int n = StringLen(s);
   for(int i = start + 1; i < n; i++)
     {
      ushort c = StringGetCharacter(s, i);
      if(c == '\\')
         i++;
      else if(c == '"')
         return(i);
     }
   return(n - 1);
  }

int JsonValueEnd(const string s, const int start)    // index just past the value at start
  {
   int n = StringLen(s);
   ushort c = StringGetCharacter(s, start);
   if(c == '"')
      return(JsonStringEnd(s, start) + 1);
   if(c == '{' || c == '[')
     {
      int depth = 0;
      for(int i = start; i < n; i++)
        {
         c = StringGetCharacter(s, i);
         if(c == '"')
            i = JsonStringEnd(s, i);
         else if(c == '{' || c == '[')
            depth++;
         else if(c == '}' || c == ']')
           {
            depth--;
            if(depth == 0)
               return(i + 1);
           }
        }
      return(n);
     }
   for(int i = start; i < n; i++)
     {
      c = StringGetCharacter(s, i);
      if(c == ',' || c == '}' || c == ']' || c == ' ')
         return(i);
     }
   return(n);
  }

// The raw text of a top-level member of a JSON object (strings keep their quotes; "" when absent).
// wsd sends compact JSON; only the top level is searched, so a key inside "data" never matches.
string JsonRaw(const string obj, const string key)
  {
   int n = StringLen(obj);
   if(n < 2 || StringGetCharacter(obj, 0) != '{')
      return("");
   int i = 1;
   while(i < n)
     {
      ushort c = StringGetCharacter(obj, i);
      if(c == '"')
        {
         int end = JsonStringEnd(obj, i);
         string name = StringSubstr(obj, i + 1, end - i - 1);
         int vs = end + 2;                           // past '":'
         int ve = JsonValueEnd(obj, vs);
         if(name == key)
            return(StringSubstr(obj, vs, ve - vs));
         i = ve;
        }
      else
         i++;
     }
   return("");
  }

string JsonString(const string obj, const string key)
  {
   string raw = JsonRaw(obj, key);
   if(StringLen(raw) >= 2 && StringGetCharacter(raw, 0) == '"')
      return(StringSubstr(raw, 1, StringLen(raw) - 2)); // ids, channels and epochs have no escapes
   return(raw);
  }

// The items of a JSON array, raw.
int JsonArrayItems(const string arr, string &items[])
  {
   ArrayResize(items, 0);
   int n = StringLen(arr);
   int i = 1;
   while(i < n)
     {
      ushort c = StringGetCharacter(arr, i);
      if(c == ',' || c == ' ' || c == ']')
        {
         i++;
         continue;
        }
      int end = JsonValueEnd(arr, i);
      int k = ArraySize(items);
      ArrayResize(items, k + 1);
      items[k] = StringSubstr(arr, i, end - i);
      i = end;
     }
   return(ArraySize(items));
  }
//+------------------------------------------------------------------+
