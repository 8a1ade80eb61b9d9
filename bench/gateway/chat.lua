-- wrk script: POST a small chat completion request with an API key.
--
--   wrk ... -s chat.lua http://127.0.0.1:PORT -- KEY MODEL
--
-- Each request says its own number, so no two bodies are alike: a gateway's
-- loop guard (which refuses a run of identical requests) and any response
-- cache see ordinary distinct traffic. The key goes in the Authorization
-- header as a bearer token; an upstream that checks nothing ignores it.

local counter = 0
local model = "bench"
local prefix = '{"model":"'
local middle = '","max_tokens":16,"messages":[{"role":"user","content":"Say hello, request '

function init(args)
   if args[1] ~= nil and args[1] ~= "" then
      wrk.headers["Authorization"] = "Bearer " .. args[1]
   end
   if args[2] ~= nil then
      model = args[2]
   end
   wrk.method = "POST"
   wrk.path = "/v1/chat/completions"
   wrk.headers["Content-Type"] = "application/json"
end

function request()
   counter = counter + 1
   local body = prefix .. model .. middle .. counter .. '."}]}'
   return wrk.format(nil, nil, nil, body)
end
