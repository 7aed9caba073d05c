/*
 * Mediator's modal checkout, with BTCPay Server's `btcpay.js` interface (`/modal/btcpay.js`), for
 * shop plugins that open the checkout over their own page (WooCommerce's "modal checkout"):
 *
 *   btcpay.setApiUrlPrefix(serverUrl)   where the checkout pages are (default: this script's origin)
 *   btcpay.showInvoice(invoiceId)       opens the invoice's checkout page in a frame over the page
 *   btcpay.onModalReceiveMessage(f)     f(event) for each message of the checkout frame:
 *                                       "loaded", "close", {invoiceId, status}
 *   btcpay.hideFrame() / showFrame()    closes / shows the frame
 *   btcpay.onModalWillEnter(f) / onModalWillLeave(f)
 *
 * Each `on...` call replaces the callback before it, as BTCPay's does (a shop that opens the
 * modal again registers again). Only messages from the frame this script opened, from the
 * origin it was opened at, are passed on.
 */
(function () {
  "use strict";
  if (window.btcpay && window.btcpay.mediator) return;
  var origin = "";
  try {
    origin = new URL(document.currentScript.src).origin;
  } catch (e) {
    origin = "";
  }
  var frame = null, frameOrigin = "";
  var received = null, entering = null, leaving = null;

  function run(f, arg) {
    if (typeof f !== "function") return;
    try { f(arg); } catch (e) { setTimeout(function () { throw e; }); }
  }

  function setApiUrlPrefix(url) {
    try { origin = new URL(String(url), location.href).origin; } catch (e) { /* kept */ }
  }

  function showFrame() {
    if (!frame) return;
    frame.style.display = "block";
    run(entering);
  }

  function hideFrame() {
    if (!frame) return;
    var f = frame;
    frame = null;
    if (f.parentNode) f.parentNode.removeChild(f);
    run(leaving);
  }

  function showInvoice(invoiceId) {
    if (frame) hideFrame();
    var f = document.createElement("iframe");
    f.name = "btcpay";
    f.title = "Bitcoin payment";
    f.setAttribute("allow", "clipboard-write");
    f.style.cssText = "position:fixed;top:0;left:0;width:100%;height:100%;border:0;margin:0;" +
      "z-index:2147483647;background:rgba(0,0,0,0.55);display:block;";
    f.src = origin + "/i/" + encodeURIComponent(String(invoiceId)) + "?view=modal";
    frame = f;
    frameOrigin = origin;
    document.body.appendChild(f);
    run(entering);
  }

  window.addEventListener("message", function (event) {
    if (!frame || event.source !== frame.contentWindow || event.origin !== frameOrigin) return;
    if (event.data === "close") hideFrame();
    run(received, event);
  });

  window.btcpay = {
    mediator: true,
    setApiUrlPrefix: setApiUrlPrefix,
    showInvoice: showInvoice,
    appendAndShowInvoiceId: showInvoice,
    showFrame: showFrame,
    hideFrame: hideFrame,
    onModalReceiveMessage: function (f) { received = f; },
    onModalWillEnter: function (f) { entering = f; },
    onModalWillLeave: function (f) { leaving = f; }
  };
})();
